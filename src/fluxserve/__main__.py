import sys

from fluxserve.cli import main

sys.exit(main())
