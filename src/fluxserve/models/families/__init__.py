"""One descriptor module per family (see :mod:`fluxserve.models.descriptor`). The registry line that adds each
to the server is in :mod:`fluxserve.models.registry`."""
