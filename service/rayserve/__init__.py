"""The service on Ray Serve (the ``scale`` extra): the one part of ``service`` that imports Ray.

``service.rayserve.app:build_app`` is the application builder named by ``deploy/ray/serve.yaml``.
"""
