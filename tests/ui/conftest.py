from ..client.conftest import procs, service  # noqa: F401 (fixtures: `modelpress up`)
