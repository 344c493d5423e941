"""Signed webhooks for finished jobs: URL rules against request forgery (:mod:`.urls`) and delivery
from the job store's outbox (:mod:`.delivery`). Imports neither torch nor the engine."""
