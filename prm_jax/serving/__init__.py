"""`prm-jax serve`: the PRM behind vLLM's /pooling and OpenRLHF's /get_reward, with dynamic batching."""
