"""One module per paper; methods register here (built-ins) or through the ``studio.methods`` entry point."""
