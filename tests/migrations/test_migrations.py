from sqlalchemy import create_engine, inspect

from modelpress.domain.models import Base
from modelpress.migrations.runner import downgrade, upgrade


def test_upgrade_downgrade_roundtrip_postgres(pg_url):
    eng = create_engine(pg_url)
    assert set(Base.metadata.tables) <= set(inspect(eng).get_table_names())
    downgrade(pg_url, "base")
    assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    upgrade(pg_url)
    tables = set(inspect(eng).get_table_names())
    assert set(Base.metadata.tables) <= tables
    eng.dispose()


def test_schema_matches_models(pg_url):
    """Autogenerate finds nothing to change: the migrations describe exactly the ORM models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    eng = create_engine(pg_url)
    with eng.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    eng.dispose()
    assert diff == []
