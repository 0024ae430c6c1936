"""The photo-sharing product: web node (public API), app node (domain), schema, settings.

Entry points live in submodules so importing the package stays cheap:
``photostack.service.web.create_app``, ``photostack.service.app.create_app``,
``photostack.service.schema.apply_schema``, ``photostack.service.settings``,
``photostack.service.testing`` (in-process fakes).
"""

__all__: list[str] = []
