"""modelpress."""
