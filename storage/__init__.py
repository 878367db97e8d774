"""Storage at scale: which PostgreSQL this is (plain, TimescaleDB Apache or full edition)."""
