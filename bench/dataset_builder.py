"""Benchmark datasets: many small text logs, a few large files, one huge file, a scan tree.

Each dataset is written once under ``.bench/data/<dirname>`` and reused by
later runs. A manifest ``<dirname>.json`` beside the directory records the
spec and every file with its size. It is written last, so a build that
was interrupted is detected and redone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
WRITE_CHUNK_BYTES = 8 * MiB
MANIFEST_VERSION = 1

GENERATED_NODES = ["planner", "localizer", "lidar_driver", "camera_front", "can_bridge", "mpc"]
GENERATED_LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR"]


@dataclass(frozen=True)
class DatasetSpec:
    """Shape of one dataset.

    ``content`` is ``"log"`` (text made of log lines) or ``"random"``
    (incompressible bytes, standing in for bag files). Sizes are in bytes
    and drawn uniformly from ``[min_size, max_size]`` with a fixed seed.
    ``depth`` 1 puts the folders directly under the root; depth 2 nests
    them ten to a parent folder.
    """

    name: str
    description: str
    file_count: int
    folder_count: int
    min_size: int
    max_size: int
    content: str
    depth: int = 1
    seed: int = 20261204

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.file_count}-files-{self.max_size // KiB}KiB"


@dataclass(frozen=True)
class Dataset:
    """A built dataset: its root and every file as (relative POSIX path, size in bytes)."""

    spec: DatasetSpec
    root: Path
    files: tuple[tuple[str, int], ...]
    content_source: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def file_count(self) -> int:
        return len(self.files)


def standard_specs(quick: bool) -> dict[str, DatasetSpec]:
    """Return the specs of datasets A to D, smaller ones when ``quick`` is set."""
    if quick:
        small_files, big_count, big_size, huge_size, tree_files = (
            1000,
            2,
            64 * MiB,
            256 * MiB,
            20000,
        )
    else:
        small_files, big_count, big_size, huge_size, tree_files = 5000, 4, 256 * MiB, GiB, 100000

    return {
        "A": DatasetSpec(
            "A",
            f"{small_files:,} text logs of 4-64 KiB in 50 folders",
            small_files,
            50,
            4 * KiB,
            64 * KiB,
            "log",
        ),
        "B": DatasetSpec(
            "B",
            f"{big_count} files of {big_size // MiB} MiB",
            big_count,
            1,
            big_size,
            big_size,
            "random",
        ),
        "C": DatasetSpec(
            "C", f"1 file of {huge_size // MiB} MiB", 1, 1, huge_size, huge_size, "random"
        ),
        "D": DatasetSpec(
            "D",
            f"{tree_files:,}-file tree of 0.1-1 KiB logs in {tree_files // 100:,} folders",
            tree_files,
            tree_files // 100,
            100,
            KiB,
            "log",
            depth=2,
        ),
    }


def load_log_lines(sample_dir: Path | None) -> tuple[list[bytes], str]:
    """Return log lines to fill text files with, and a name for where they came from.

    Lines come from every ``*.log`` file in ``sample_dir`` when it exists;
    otherwise they are generated in a ROS 2 node log format.
    """
    lines: list[bytes] = []
    if sample_dir is not None and sample_dir.is_dir():
        for path in sorted(sample_dir.glob("*.log")):
            lines.extend(line + b"\n" for line in path.read_bytes().splitlines() if line)

    if lines:
        return lines, f"lines of {sample_dir}"
    return generate_log_lines(20000), "generated log lines"


def generate_log_lines(count: int, seed: int = 7) -> list[bytes]:
    """Generate ``count`` ROS 2 style log lines with varying nodes, levels and numbers."""
    rng = random.Random(seed)
    start = 1796400000.0
    lines = []
    for index in range(count):
        stamp = start + index * 0.013
        node = rng.choice(GENERATED_NODES)
        level = rng.choice(GENERATED_LEVELS)
        value = rng.random() * 100
        text = f"[{level}] [{stamp:.6f}] [{node}]: cycle {index} took {value:.3f} ms, queue {rng.randrange(64)}\n"
        lines.append(text.encode())
    return lines


def folder_name(index: int, depth: int) -> str:
    if depth == 1:
        return f"node-{index:03d}"
    return f"session-{index // 10:03d}/node-{index % 10}"


def plan_files(spec: DatasetSpec) -> list[tuple[str, int]]:
    """Return the relative path and size of every file of ``spec``, in creation order."""
    rng = random.Random(spec.seed)
    suffix = ".log" if spec.content == "log" else ".bin"
    files = []
    for number in range(spec.file_count):
        folder = folder_name(number % spec.folder_count, spec.depth)
        size = rng.randint(spec.min_size, spec.max_size)
        files.append((f"{folder}/file-{number:06d}{suffix}", size))
    return files


def write_log_file(path: Path, size: int, lines: list[bytes], rng: random.Random) -> None:
    """Write ``size`` bytes of consecutive lines starting at a random line."""
    parts = []
    written = 0
    position = rng.randrange(len(lines))
    while written < size:
        line = lines[position]
        parts.append(line)
        written += len(line)
        position = (position + 1) % len(lines)
    path.write_bytes(b"".join(parts)[:size])


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        remaining = size
        while remaining > 0:
            chunk = min(remaining, WRITE_CHUNK_BYTES)
            handle.write(os.urandom(chunk))
            remaining -= chunk


def _manifest_path(data_dir: Path, spec: DatasetSpec) -> Path:
    return data_dir / f"{spec.dirname}.json"


def _read_cached(data_dir: Path, spec: DatasetSpec) -> Dataset | None:
    """Return the cached dataset if its manifest matches ``spec`` and every file is there."""
    manifest_path = _manifest_path(data_dir, spec)
    if not manifest_path.exists():
        return None

    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("spec") != asdict(spec):
        return None

    root = data_dir / spec.dirname
    files = tuple((relative, size) for relative, size in manifest["files"])
    for relative, size in files:
        try:
            if os.stat(root / relative).st_size != size:
                return None
        except FileNotFoundError:
            return None
    return Dataset(spec, root, files, manifest["content_source"])


def build_dataset(data_dir: Path, spec: DatasetSpec, sample_dir: Path | None) -> Dataset:
    """Return the dataset of ``spec``, building it unless a complete copy is cached."""
    cached = _read_cached(data_dir, spec)
    if cached is not None:
        logger.info("Using cached dataset %s (%s)", spec.name, cached.root)
        return cached

    root = data_dir / spec.dirname
    manifest_path = _manifest_path(data_dir, spec)
    manifest_path.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)

    logger.info("Building dataset %s: %s in %s", spec.name, spec.description, root)
    started = time.monotonic()
    files = plan_files(spec)
    content_source = _write_files(root, spec, files, sample_dir)
    os.sync()

    manifest = {
        "version": MANIFEST_VERSION,
        "spec": asdict(spec),
        "content_source": content_source,
        "files": files,
    }
    manifest_path.write_text(json.dumps(manifest))
    logger.info("Built dataset %s in %.1f s", spec.name, time.monotonic() - started)
    return Dataset(spec, root, tuple(files), content_source)


def _write_files(
    root: Path, spec: DatasetSpec, files: list[tuple[str, int]], sample_dir: Path | None
) -> str:
    """Write every planned file and return a description of the content source."""
    for relative, _ in files:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)

    if spec.content == "random":
        for relative, size in files:
            write_random_file(root / relative, size)
        return "random bytes"

    lines, content_source = load_log_lines(sample_dir)
    rng = random.Random(spec.seed + 1)
    for relative, size in files:
        write_log_file(root / relative, size, lines, rng)
    return content_source


def evict_from_page_cache(dataset: Dataset) -> None:
    """Drop the dataset's file pages from the page cache, so the next reader reads the disk.

    Uses ``posix_fadvise(POSIX_FADV_DONTNEED)`` per file, which needs no
    privileges and touches no other file. Pages still dirty are not dropped;
    the builder syncs after writing, so there should be none.
    """
    for relative, _ in dataset.files:
        descriptor = os.open(dataset.root / relative, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
