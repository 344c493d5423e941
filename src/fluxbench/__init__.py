"""Benchmarks of fluxserve, kept out of the serving package: ``fluxserve bench`` (:mod:`.serving`: plain
diffusers, the engine and the HTTP server on the same machine in one run) and the Ray Serve scaling bench
(:mod:`.ray`). The server never imports this package."""
