"""Container logs in the kubelet's CRI format: writer (parent), reader (agent).

format  the record format, timestamps, rotated file names
writer  LogWriter, fed by the parent's selector loop from container pipes
reader  read_logs / LogReader, what `kubectl logs` gets from the node API
"""

from .format import LogFormatError, Record, format_timestamp, parse_line, parse_timestamp
from .reader import LogReader, container_log_files, read_logs
from .writer import LogWriter, container_log_dir

__all__ = [
    "LogFormatError", "Record", "format_timestamp", "parse_line", "parse_timestamp",
    "LogReader", "container_log_files", "read_logs",
    "LogWriter", "container_log_dir",
]
