"""Wire types generated from protos/bios/v1 by `make proto` (never committed)."""
