"""Command-line interface of compressor: parses options and calls the library, nothing else."""
