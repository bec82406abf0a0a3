"""modelpress.domain: what the API and the workers share.

Settings, the database (engine, session, ORM models), the job state machine, the artifact store
and API keys. Small on purpose: no HTTP and no Celery in here.
"""
