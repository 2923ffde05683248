"""mmgen: autoregressive visual generation."""
