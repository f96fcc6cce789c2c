"""File outputs: canonical JSON, QuickBooks Online and Xero import CSVs, the run summary."""
