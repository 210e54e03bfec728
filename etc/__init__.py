"""Default configuration files shipped with memos."""
