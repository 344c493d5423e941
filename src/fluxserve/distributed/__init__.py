"""Scaling out on Ray Serve (``pip install "fluxserve[ray]"``, ``fluxserve serve --ray``).

fluxserve does not run a cluster of its own: Ray Serve places replicas, routes, autoscales and
replaces dead replicas. This package only adapts fluxserve's own pieces to it:

* :mod:`.config` — settings → Ray deployment options (replicas, autoscaling, queue bound);
* :mod:`.messages` — what travels between the ingress and the model replicas;
* :mod:`.replica` — :class:`~.replica.ReplicaWorker`, one :class:`~fluxserve.runtime.Runtime`
  (engine, scheduler, dynamic batching) per model replica;
* :mod:`.ingress` — the HTTP side: the app of :func:`fluxserve.api.app.create_app` on an
  :class:`~.ingress.IngressRuntime` whose scheduler dispatches jobs to the model replicas;
* :mod:`.deployments` and :mod:`.ray_serve` — the Ray Serve deployments, the application builder
  (``serve run``/Serve config YAML) and :func:`~.ray_serve.run_ray` behind ``fluxserve serve --ray``.

Only the last two import Ray; everything else is testable without it.
"""
