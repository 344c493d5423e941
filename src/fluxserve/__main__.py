from fluxserve.cli import run

run()
