"""Run directories seen from outside: listing them and plotting their metrics."""
