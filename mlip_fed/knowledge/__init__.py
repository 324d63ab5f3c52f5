"""knowledge subpackage."""
