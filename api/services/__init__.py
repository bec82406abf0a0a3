"""Service functions behind the routes: plain functions of (session, store, owner, input).
They raise :mod:`modelpress.api.errors` exceptions and never commit (the request does)."""
