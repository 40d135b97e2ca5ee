#!/usr/bin/env bash
# Install tvm-upload as a hardened systemd service.
#
# Safe to run again: directories, the virtual environment and the unit file
# are brought to the same state, and an existing config.yaml is never
# touched. Run it again after changing log_directories or state_file in
# config.yaml, because the unit's ReadWritePaths= line is derived from them.
set -euo pipefail

readonly SERVICE_USER=tvm-upload
readonly CONFIG_DIR=/etc/tvm-upload
readonly CONFIG_FILE=/etc/tvm-upload/config.yaml
readonly CREDENTIALS_DIR=/etc/tvm-upload/aws
readonly STATE_DIR=/var/lib/tvm-upload
readonly INSTALL_DIR=/opt/tvm-upload
readonly VENV_DIR=/opt/tvm-upload/venv
readonly UNIT_FILE=/etc/systemd/system/tvm-upload.service
readonly COMMAND_LINK=/usr/local/bin/tvm-upload

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS]

Install tvm-upload: the system user, /etc/tvm-upload, /var/lib/tvm-upload,
a virtual environment in /opt/tvm-upload/venv, the tvm-upload command in
/usr/local/bin and the systemd unit.

Options:
  --root DIR     install into DIR instead of / (for tests and image builds);
                 implies --no-user and skips systemctl
  --source DIR   source tree to install from (default: the tree holding
                 this script)
  --wheel FILE   install this wheel into the virtual environment instead of
                 the source tree
  --python PATH  Python 3.10+ used to create the virtual environment and to
                 read config.yaml (default: python3)
  --no-venv      do not create or update the virtual environment
  --no-user      do not create the tvm-upload system user
  -h, --help     show this help
EOF
}

say() {
    printf 'install.sh: %s\n' "$*"
}

warn() {
    printf 'install.sh: warning: %s\n' "$*" >&2
}

fail() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

usage_error() {
    printf 'install.sh: error: %s\n' "$*" >&2
    usage >&2
    exit 2
}

# Path of an installed file as seen from this host (prefixed with --root).
target() {
    printf '%s%s' "$ROOT_PREFIX" "$1"
}

parse_arguments() {
    ROOT=/
    SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    WHEEL=
    PYTHON=python3
    MAKE_VENV=yes
    MAKE_USER=yes

    while [[ $# -gt 0 ]]; do
        case "$1" in
            --root) [[ $# -ge 2 ]] || usage_error "--root needs a directory"; ROOT=$2; shift ;;
            --source) [[ $# -ge 2 ]] || usage_error "--source needs a directory"; SOURCE_DIR=$2; shift ;;
            --wheel) [[ $# -ge 2 ]] || usage_error "--wheel needs a file"; WHEEL=$2; shift ;;
            --python) [[ $# -ge 2 ]] || usage_error "--python needs a path"; PYTHON=$2; shift ;;
            --no-venv) MAKE_VENV=no ;;
            --no-user) MAKE_USER=no ;;
            -h | --help) usage; exit 0 ;;
            *) usage_error "unknown option: $1" ;;
        esac
        shift
    done
}

check_arguments() {
    [[ -d "$ROOT" ]] || fail "--root $ROOT is not a directory; create it first"
    ROOT=$(cd "$ROOT" && pwd -P)
    ROOT_PREFIX=${ROOT%/}

    [[ -d "$SOURCE_DIR" ]] || fail "--source $SOURCE_DIR is not a directory"
    SOURCE_DIR=$(cd "$SOURCE_DIR" && pwd -P)
    [[ -f "$SOURCE_DIR/packaging/tvm-upload.service" ]] ||
        fail "$SOURCE_DIR is not a tvm-upload source tree: packaging/tvm-upload.service is missing"

    if [[ -n "$WHEEL" && ! -f "$WHEEL" ]]; then
        fail "--wheel $WHEEL does not exist"
    fi

    if [[ "$ROOT" == / && $EUID -ne 0 ]]; then
        fail "installing into / needs root; run it with sudo, or use --root DIR"
    fi
}

# Files are chowned to the service account only on the live system, where
# the account is known. A --root tree keeps the installing user's ownership.
decide_ownership() {
    SET_OWNER=no
    if [[ "$ROOT" != / ]]; then
        say "--root $ROOT: skipping ownership changes, set them on the target system"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        SET_OWNER=yes
    else
        say "user $SERVICE_USER does not exist: skipping ownership changes"
    fi
}

create_user() {
    if [[ "$ROOT" != / ]]; then
        say "--root $ROOT: not creating the $SERVICE_USER user, create it on the target system"
        return
    fi

    if [[ "$MAKE_USER" == no ]]; then
        say "--no-user: not creating the $SERVICE_USER user"
        return
    fi

    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER already exists"
        return
    fi

    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "tvm-upload log upload daemon" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
}

# make_directory PATH MODE OWNER: create PATH and set its mode, and its
# owner when ownership is managed.
make_directory() {
    local path
    path=$(target "$1")
    mkdir -p "$path"
    chmod "$2" "$path"
    if [[ "$SET_OWNER" == yes ]]; then
        chown "$3" "$path"
    fi
}

create_directories() {
    make_directory "$INSTALL_DIR" 0755 root:root
    make_directory "$CONFIG_DIR" 0750 "root:$SERVICE_USER"
    make_directory "$CREDENTIALS_DIR" 0750 "root:$SERVICE_USER"
    make_directory "$STATE_DIR" 0750 "$SERVICE_USER:$SERVICE_USER"
    mkdir -p "$(target /etc/systemd/system)"
    say "directories ready: $CONFIG_DIR $CREDENTIALS_DIR $STATE_DIR $INSTALL_DIR"
}

install_venv() {
    if [[ "$MAKE_VENV" == no ]]; then
        say "--no-venv: leaving $VENV_DIR as it is"
        return
    fi

    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        fail "$PYTHON is older than Python 3.10; pass a newer one with --python"

    # A virtual environment whose interpreter no longer runs, for example
    # after a distribution upgrade replaced Python, is built again.
    local venv
    venv=$(target "$VENV_DIR")
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        "$PYTHON" -m venv --clear "$venv"
        say "created virtual environment $VENV_DIR"
    fi

    local package=$SOURCE_DIR
    if [[ -n "$WHEEL" ]]; then
        package=$WHEEL
    fi
    "$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade "$package"
    say "installed tvm-upload from $package into $VENV_DIR"

    if [[ "$ROOT" != / ]]; then
        say "NOTE: scripts in $venv name their interpreter with the $ROOT prefix"
    fi
}

# Put the tvm-upload command on PATH, unless something else already owns that name.
link_command() {
    local link
    link=$(target "$COMMAND_LINK")
    if [[ ! -x "$(target "$VENV_DIR")/bin/tvm-upload" ]]; then
        return
    fi

    if [[ -e "$link" || -L "$link" ]] && [[ "$(readlink "$link")" != "$VENV_DIR/bin/tvm-upload" ]]; then
        warn "$COMMAND_LINK already exists and is not install.sh's link; leaving it as it is"
        return
    fi

    mkdir -p "$(dirname "$link")"
    ln -sfn "$VENV_DIR/bin/tvm-upload" "$link"
    say "linked $COMMAND_LINK to $VENV_DIR/bin/tvm-upload"
}

install_config() {
    local config example
    config=$(target "$CONFIG_FILE")
    example=$SOURCE_DIR/config/config.yaml.example

    if [[ -e "$config" || -L "$config" ]]; then
        say "keeping existing $CONFIG_FILE"
        return
    fi

    [[ -f "$example" ]] || fail "$example is missing, so there is no config.yaml to start from"
    install -m 0640 "$example" "$config"
    if [[ "$SET_OWNER" == yes ]]; then
        chown "root:$SERVICE_USER" "$config"
    fi
    say "copied $example to $CONFIG_FILE: edit vehicle_id, log_directories and s3 before starting"
}

# Python program that prints the value of the unit's ReadWritePaths= line
# for config.yaml: the state store's directory and each log directory that
# retention may delete from. Arguments: config path on this host, --root
# prefix. It exits with 3 when PyYAML is not importable, so that the caller
# can try another interpreter, and with 4 when config.yaml cannot be read.
read -r -d '' READ_WRITE_PATHS_PY <<'PY' || true
import os
import re
import sys

try:
    import yaml
except ImportError:
    sys.exit(3)

# Retention never deletes under these top-level directories, so a log
# directory there needs no write access.
PROTECTED = {"bin", "boot", "dev", "etc", "lib", "lib64", "opt", "proc", "root", "run", "sbin",
             "srv", "sys", "usr", "var"}
DEFAULT_STATE_FILE = "/var/lib/tvm-upload/state.db"
# ${NAME}, $NAME and $$ (a literal $), as config.yaml spells variables.
VARIABLE = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def note(message):
    print("install.sh: " + message, file=sys.stderr)


def warn(message):
    note("warning: " + message)


def load_validated(config_path):
    """Load config.yaml with the installed package: defaults and expansion as in the daemon."""
    try:
        from tvm_upload.config import load_config
    except ImportError:
        return None
    try:
        return load_config(config_path).model_dump(mode="json")
    except Exception as error:
        warn("config.yaml is not valid, so it is read as plain YAML: %s" % error)
        return None


def load_raw(config_path):
    try:
        with open(config_path, encoding="utf-8") as stream:
            return yaml.safe_load(stream) or {}
    except (OSError, yaml.YAMLError) as error:
        print("install.sh: error: cannot read %s: %s" % (config_path, error), file=sys.stderr)
        sys.exit(4)


def expand_variables(value):
    """Expand variables as the service would see them, or return None if one is undefined."""
    undefined = []

    def replace(match):
        if match.group(1):
            return "$"
        name = match.group(2) if match.group(2) is not None else match.group(3)
        if name not in os.environ:
            undefined.append(name)
            return ""
        return os.environ[name]

    expanded = VARIABLE.sub(replace, value)
    if undefined:
        warn("%s uses $%s, which the service environment does not define; add its directory "
             "to ReadWritePaths= in a drop-in if needed" % (value, undefined[0]))
        return None
    return os.path.expanduser(expanded)


def to_path(value, validated):
    """Return an absolute, normalised path, or None when there is none to grant."""
    if not isinstance(value, str) or not value.strip():
        return None
    path = value if validated else expand_variables(value.strip())
    if path is None:
        return None
    if not os.path.isabs(path):
        warn("%s is not an absolute path; leaving it out of ReadWritePaths=" % value)
        return None
    return os.path.normpath(path)


def is_true(value):
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "on", "1"}
    return bool(value)


def is_protected(path, root_prefix):
    candidates = [path]
    if not root_prefix:
        candidates.append(os.path.realpath(path))
    return any(candidate.split("/")[1] in PROTECTED for candidate in candidates)


def deletable_directories(data, validated, root_prefix):
    for entry in data.get("log_directories") or []:
        if isinstance(entry, dict):
            value, allowed = entry.get("path"), is_true(entry.get("allow_deletion", True))
        else:
            value, allowed = entry, True
        path = to_path(value, validated) if allowed else None
        if path is None:
            continue
        if is_protected(path, root_prefix):
            note("%s is under a protected system directory, where retention never deletes: "
                 "kept read-only" % path)
            continue
        if not os.path.isdir(root_prefix + path):
            where = ("under --root (checked %s)" % (root_prefix + path) if root_prefix
                     else "on this host")
            warn("%s does not exist yet %s; it becomes writable only if it exists when the "
                 "service starts" % (path, where))
        yield path


def legacy_state_directories(data, validated, root_prefix):
    """Directories of old JSON state files still to be imported, then renamed *.imported."""
    upload = data.get("upload") or {}
    registry = upload.get("processed_files_registry") or {}
    for value in (upload.get("queue_file"), registry.get("registry_file")):
        path = to_path(value, validated)
        if path is not None and os.path.isfile(root_prefix + path):
            yield os.path.dirname(path)


def unit_word(path):
    """Quote a path for ReadWritePaths=, with "-" so that a missing path is skipped."""
    word = "-" + path.replace("%", "%%")
    if re.search(r"[\s\"'\\]", word):
        word = '"' + re.sub(r"([\"'\\])", r"\\\1", word) + '"'
    return word


def main():
    config_path, root_prefix = sys.argv[1], sys.argv[2]
    data = load_validated(config_path)
    validated = data is not None
    if not validated:
        data = load_raw(config_path)
    if not isinstance(data, dict):
        print("install.sh: error: %s is not a YAML mapping" % config_path, file=sys.stderr)
        sys.exit(4)

    state_file = to_path(data.get("state_file") or DEFAULT_STATE_FILE, validated)
    paths = [os.path.dirname(state_file or DEFAULT_STATE_FILE)]
    paths += deletable_directories(data, validated, root_prefix)
    paths += legacy_state_directories(data, validated, root_prefix)

    words = []
    for path in dict.fromkeys(paths):
        if any(ord(character) < 0x20 or ord(character) == 0x7F for character in path):
            warn("%r contains control characters; leaving it out of ReadWritePaths=" % path)
            continue
        words.append(unit_word(path))
    print(" ".join(words))


main()
PY

# Print the interpreters that may read config.yaml, best first: the one in
# the virtual environment can use the daemon's own config loader.
config_readers() {
    local venv_python tvm_upload_command shebang
    venv_python=$(target "$VENV_DIR")/bin/python
    if [[ -x "$venv_python" ]]; then
        printf '%s\n' "$venv_python"
    fi

    if [[ "$ROOT" == / ]] && tvm_upload_command=$(command -v tvm-upload); then
        IFS= read -r shebang <"$tvm_upload_command" || true
        if [[ "$shebang" == '#!/'* ]]; then
            printf '%s\n' "${shebang#\#!}"
        fi
    fi

    command -v "$PYTHON" || true
}

# Print the home directory that systemd puts in the service's $HOME, which is
# what "~" means in config.yaml.
service_home() {
    local home
    if [[ "$ROOT" == / ]] && home=$(getent passwd "$SERVICE_USER" | cut -d: -f6) &&
        [[ -n "$home" ]]; then
        printf '%s\n' "$home"
    else
        printf '%s\n' "$STATE_DIR"
    fi
}

# Set READ_WRITE_PATHS from config.yaml. The reader runs with an
# environment like the one systemd gives the service, so ${VAR} and ~
# expand as they will in the daemon.
derive_read_write_paths() {
    local config reader status home
    config=$(target "$CONFIG_FILE")
    home=$(service_home)
    READ_WRITE_PATHS=

    while IFS= read -r reader; do
        status=0
        READ_WRITE_PATHS=$(env -i HOME="$home" USER="$SERVICE_USER" LOGNAME="$SERVICE_USER" \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
            "$reader" -c "$READ_WRITE_PATHS_PY" "$config" "$ROOT_PREFIX") || status=$?
        # 4 means config.yaml itself is unreadable, which no other reader fixes.
        case "$status" in
            0) return ;;
            4) break ;;
            *) continue ;;
        esac
    done < <(config_readers)

    READ_WRITE_PATHS=-$STATE_DIR
    warn "could not read $CONFIG_FILE (no Python with PyYAML, or a YAML error);" \
        "ReadWritePaths= lists only $STATE_DIR, so retention cannot delete log files." \
        "Fix it and run install.sh --no-venv again."
}

install_unit() {
    local template unit temporary line
    template=$SOURCE_DIR/packaging/tvm-upload.service
    unit=$(target "$UNIT_FILE")
    temporary=$(mktemp "$unit.XXXXXX")

    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" == ReadWritePaths=* ]]; then
            line="ReadWritePaths=$READ_WRITE_PATHS"
        fi
        printf '%s\n' "$line"
    done <"$template" >"$temporary"

    chmod 0644 "$temporary"
    mv -f "$temporary" "$unit"
    say "installed $UNIT_FILE with ReadWritePaths=$READ_WRITE_PATHS"
}

systemd_is_running() {
    [[ "$ROOT" == / && -d /run/systemd/system ]] && command -v systemctl >/dev/null
}

reload_systemd() {
    if ! systemd_is_running; then
        say "systemd is not running here (or --root is set): skipping systemctl daemon-reload"
        return
    fi

    systemctl daemon-reload
    say "systemd reloaded its unit files"
    if systemctl is-active --quiet tvm-upload.service; then
        say "tvm-upload is running the old version: systemctl restart tvm-upload"
    fi
}

main() {
    parse_arguments "$@"
    check_arguments
    create_user
    decide_ownership
    create_directories
    install_config
    install_venv
    link_command
    derive_read_write_paths
    install_unit
    reload_systemd
    say "done. Next: edit $CONFIG_FILE, then tvm-upload check-config," \
        "tvm-upload doctor and systemctl enable --now tvm-upload"
}

main "$@"
