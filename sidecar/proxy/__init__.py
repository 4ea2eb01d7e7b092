"""The proxy listener: the agent's only way out."""
