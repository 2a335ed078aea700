"""`python -m exporter` runs the exporter, same as the `conntrack-dns-exporter` script."""

from exporter.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
