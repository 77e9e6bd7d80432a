"""The policy engine: rules per SMTP stage turning check results into verdicts."""
