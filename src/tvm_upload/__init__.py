"""tvm-upload: the log upload daemon for autonomous vehicles."""

__version__ = "0.1.0"
