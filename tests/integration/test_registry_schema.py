"""The registry schema after migrations, pinned object by object.

A regression guard: the expected description below was written by reading the
migrations sql/0001_registry.sql .. sql/0006_queue_timeout.sql (plus the
`schema_migrations` bookkeeping table that daemon/registry/migrations.py
creates), then cross-checked against what PostgreSQL reports. Any change to a
migration's effect on tables, columns, constraints, indexes, triggers, trigger
functions or the job_state enum fails one of these tests: update the expected
values here together with the new migration, on purpose.

Everything is read back from pg_catalog in its canonical, deparsed form
(format_type, pg_get_expr, pg_get_constraintdef, pg_indexes.indexdef,
pg_get_triggerdef), so the comparison does not depend on how the SQL was
spelled, only on what it built.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import psycopg

# --- expected ---------------------------------------------------------------


class Column(NamedTuple):
    name: str
    type: str  # format_type()
    not_null: bool
    default: str | None = None  # pg_get_expr() of the column default
    identity: str = ""  # pg_attribute.attidentity: "" none, "a" ALWAYS, "d" BY DEFAULT


TZ = "timestamp with time zone"

# Columns per table, in table order (the order `SELECT *` / `RETURNING *` use).
COLUMNS: dict[str, list[Column]] = {
    # 0001: the seed's table, verbatim.
    "compute_capabilities": [
        Column("peer_id", "uuid", True),
        Column("region", "text", True),
        Column("capability", "text", True),
        Column("resources", "jsonb", False),
        Column("max_concurrency", "integer", False),
    ],
    # 0001; source and status by 0005.
    "capability_executors": [
        Column("peer_id", "uuid", True),
        Column("capability", "text", True),
        Column("executor", "jsonb", True, "'{}'::jsonb"),
        Column("registered_at", TZ, True, "now()"),
        Column("source", "text", True, "'config'::text"),
        Column("status", "text", True, "'ready'::text"),
    ],
    # 0005.
    "fleet_deployments": [
        Column("region", "text", True),
        Column("capability", "text", True),
        Column("resources", "jsonb", True, "'{}'::jsonb"),
        Column("max_concurrency", "integer", True),
        Column("executor", "jsonb", True),
        Column("deployed_at", TZ, True, "now()"),
    ],
    # 0001.
    "peers": [
        Column("peer_id", "uuid", True),
        Column("address", "text", True),
        Column("region", "text", True),
        Column("state", "text", True, "'up'::text"),
        Column("version", "text", True, "''::text"),
        Column("started_at", TZ, True, "now()"),
        Column("heartbeat_at", TZ, True, "now()"),
    ],
    # 0001, then run_after (0002), handed_back (0004), queue_timeout_ms and
    # queued_at (0006) appended.
    "jobs": [
        Column("job_id", "uuid", True),
        Column("capability", "text", True),
        Column("region", "text", True),
        Column("inputs", "text[]", True, "'{}'::text[]"),
        Column("params", "jsonb", True, "'{}'::jsonb"),
        Column("resources", "jsonb", True, "'{}'::jsonb"),
        Column("locality_key", "text", True),
        Column("idempotency_key", "text", False),
        Column("request_sha256", "text", True),
        Column("timeout_ms", "bigint", True),
        Column("max_attempts", "integer", True, "3"),
        Column("submitted_by", "text", True, "''::text"),
        Column("state", "job_state", True, "'queued'::job_state"),
        Column("peer_id", "uuid", False),
        Column("attempt", "integer", True, "0"),
        Column("lease_expires_at", TZ, False),
        Column("output", "bytea", False),
        Column("output_refs", "text[]", True, "'{}'::text[]"),
        Column("error", "text", True, "''::text"),
        Column("exit_code", "integer", False),
        Column("bytes_fetched_remote", "bigint", True, "0"),
        Column("submitted_at", TZ, True, "clock_timestamp()"),
        Column("started_at", TZ, False),
        Column("finished_at", TZ, False),
        Column("updated_at", TZ, True, "clock_timestamp()"),
        # 0002. The session runs in UTC (see _connect), so the literal deparses as written.
        Column("run_after", TZ, True, f"'1970-01-01 00:00:00+00'::{TZ}"),
        # 0004.
        Column("handed_back", "integer", True, "0"),
        # 0006: no default (dropped once the existing rows had theirs).
        Column("queue_timeout_ms", "bigint", True),
        Column("queued_at", TZ, True, "clock_timestamp()"),
    ],
    # 0001.
    "job_events": [
        Column("event_id", "bigint", True, identity="a"),
        Column("job_id", "uuid", True),
        Column("at", TZ, True, "clock_timestamp()"),
        Column("attempt", "integer", True),
        Column("from_state", "job_state", False),
        Column("to_state", "job_state", True),
        Column("peer_id", "uuid", False),
        Column("detail", "text", True, "''::text"),
    ],
    # daemon/registry/migrations.py, before any migration runs.
    "schema_migrations": [
        Column("version", "integer", True),
        Column("name", "text", True),
        Column("sha256", "text", True),
        Column("applied_at", TZ, True, "now()"),
    ],
}

# 0001: CREATE TYPE job_state AS ENUM (...), labels in sort order.
JOB_STATES = ["queued", "running", "succeeded", "failed", "timed_out", "cancelled"]

# CHECK / UNIQUE / PRIMARY KEY / FOREIGN KEY / EXCLUDE constraints per table:
# name -> pg_get_constraintdef(). Unnamed constraints carry PostgreSQL's
# generated names: `<table>_<column>_check` for a check on one column,
# `<table>_check`, `<table>_check1`, ... for checks on several (in order of
# creation; jobs_check3, the version-1 `attempt <= max_attempts`, was dropped
# by 0004 and replaced by jobs_attempts_within_budget).
CONSTRAINTS: dict[str, dict[str, str]] = {
    "compute_capabilities": {
        "compute_capabilities_pkey": "PRIMARY KEY (peer_id, capability)",
    },
    "capability_executors": {
        "capability_executors_pkey": "PRIMARY KEY (peer_id, capability)",
        "capability_executors_peer_id_capability_fkey": (
            "FOREIGN KEY (peer_id, capability) "
            "REFERENCES compute_capabilities(peer_id, capability) ON DELETE CASCADE"
        ),
        # 0005.
        "capability_executors_source_check": (
            "CHECK ((source = ANY (ARRAY['config'::text, 'deployed'::text, 'fleet'::text])))"
        ),
        "capability_executors_status_check": (
            "CHECK (((status = ANY (ARRAY['pending'::text, 'ready'::text])) "
            "OR (status ~~ 'failed: %'::text)))"
        ),
    },
    "fleet_deployments": {
        "fleet_deployments_pkey": "PRIMARY KEY (region, capability)",
        "fleet_deployments_max_concurrency_check": "CHECK ((max_concurrency >= 1))",
    },
    "peers": {
        "peers_pkey": "PRIMARY KEY (peer_id)",
        "peers_state_check": (
            "CHECK ((state = ANY (ARRAY['up'::text, 'draining'::text, 'down'::text])))"
        ),
    },
    "jobs": {
        "jobs_pkey": "PRIMARY KEY (job_id)",
        "jobs_capability_check": "CHECK ((capability <> ''::text))",
        "jobs_timeout_ms_check": "CHECK ((timeout_ms >= 0))",
        "jobs_max_attempts_check": "CHECK (((max_attempts >= 1) AND (max_attempts <= 100)))",
        "jobs_attempt_check": "CHECK ((attempt >= 0))",
        # The state machine's invariants (0001).
        "jobs_check": ("CHECK (((state = 'running'::job_state) = (lease_expires_at IS NOT NULL)))"),
        "jobs_check1": (
            "CHECK (((state = ANY (ARRAY['succeeded'::job_state, 'failed'::job_state, "
            "'timed_out'::job_state, 'cancelled'::job_state])) = (finished_at IS NOT NULL)))"
        ),
        "jobs_check2": (
            "CHECK (((state <> 'running'::job_state) OR "
            "((peer_id IS NOT NULL) AND (attempt >= 1))))"
        ),
        # 0004.
        "jobs_handed_back_check": "CHECK ((handed_back >= 0))",
        "jobs_attempts_within_budget": "CHECK (((attempt - handed_back) <= max_attempts))",
        # 0006.
        "jobs_queue_timeout_ms_check": "CHECK ((queue_timeout_ms > 0))",
    },
    "job_events": {
        "job_events_pkey": "PRIMARY KEY (event_id)",
        "job_events_job_id_fkey": (
            "FOREIGN KEY (job_id) REFERENCES jobs(job_id) ON DELETE CASCADE"
        ),
    },
    "schema_migrations": {
        "schema_migrations_pkey": "PRIMARY KEY (version)",
    },
}

# Every index per table: name -> pg_indexes.indexdef (primary keys included).
INDEXES: dict[str, dict[str, str]] = {
    "compute_capabilities": {
        "compute_capabilities_pkey": (
            "CREATE UNIQUE INDEX compute_capabilities_pkey ON public.compute_capabilities "
            "USING btree (peer_id, capability)"
        ),
    },
    "capability_executors": {
        "capability_executors_pkey": (
            "CREATE UNIQUE INDEX capability_executors_pkey ON public.capability_executors "
            "USING btree (peer_id, capability)"
        ),
    },
    "fleet_deployments": {
        "fleet_deployments_pkey": (
            "CREATE UNIQUE INDEX fleet_deployments_pkey ON public.fleet_deployments "
            "USING btree (region, capability)"
        ),
    },
    "peers": {
        "peers_pkey": "CREATE UNIQUE INDEX peers_pkey ON public.peers USING btree (peer_id)",
    },
    "jobs": {
        "jobs_pkey": "CREATE UNIQUE INDEX jobs_pkey ON public.jobs USING btree (job_id)",
        # 0003 replaced 0001's (idempotency_key) with a per-submitter key.
        "jobs_idempotency_key": (
            "CREATE UNIQUE INDEX jobs_idempotency_key ON public.jobs "
            "USING btree (submitted_by, idempotency_key) WHERE (idempotency_key IS NOT NULL)"
        ),
        # 0001.
        "jobs_queued_by_peer": (
            "CREATE INDEX jobs_queued_by_peer ON public.jobs "
            "USING btree (peer_id, submitted_at, job_id) WHERE (state = 'queued'::job_state)"
        ),
        "jobs_running_lease": (
            "CREATE INDEX jobs_running_lease ON public.jobs "
            "USING btree (lease_expires_at) WHERE (state = 'running'::job_state)"
        ),
        "jobs_running_by_peer": (
            "CREATE INDEX jobs_running_by_peer ON public.jobs "
            "USING btree (peer_id) WHERE (state = 'running'::job_state)"
        ),
        # 0002.
        "jobs_queued_peer": (
            "CREATE INDEX jobs_queued_peer ON public.jobs "
            "USING btree (peer_id) WHERE (state = 'queued'::job_state)"
        ),
        "jobs_active_by_peer": (
            "CREATE INDEX jobs_active_by_peer ON public.jobs USING btree (peer_id) "
            "WHERE (state = ANY (ARRAY['queued'::job_state, 'running'::job_state]))"
        ),
        # 0003.
        "jobs_finished_at": (
            "CREATE INDEX jobs_finished_at ON public.jobs "
            "USING btree (finished_at) WHERE (finished_at IS NOT NULL)"
        ),
        # 0006: a queued job's deadline, in UTC (an index expression must be immutable).
        "jobs_queue_deadline": (
            "CREATE INDEX jobs_queue_deadline ON public.jobs USING btree "
            "((((queued_at AT TIME ZONE 'UTC'::text) + "
            "((queue_timeout_ms)::double precision * '00:00:00.001'::interval)))) "
            "WHERE (state = 'queued'::job_state)"
        ),
    },
    "job_events": {
        "job_events_pkey": (
            "CREATE UNIQUE INDEX job_events_pkey ON public.job_events USING btree (event_id)"
        ),
        "job_events_by_job": (
            "CREATE INDEX job_events_by_job ON public.job_events USING btree (job_id, event_id)"
        ),
    },
    "schema_migrations": {
        "schema_migrations_pkey": (
            "CREATE UNIQUE INDEX schema_migrations_pkey ON public.schema_migrations "
            "USING btree (version)"
        ),
    },
}

# Every user (non-internal) trigger per table: name -> pg_get_triggerdef(). All
# enabled (tgenabled = 'O'), checked separately.
TRIGGERS: dict[str, dict[str, str]] = {
    # 0005.
    "capability_executors": {
        "capability_executors_notify": (
            "CREATE TRIGGER capability_executors_notify "
            "AFTER UPDATE OF status ON public.capability_executors "
            "FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) "
            "EXECUTE FUNCTION registry_notify_membership()"
        ),
    },
    "fleet_deployments": {
        "fleet_deployments_notify": (
            "CREATE TRIGGER fleet_deployments_notify "
            "AFTER INSERT OR DELETE OR UPDATE ON public.fleet_deployments "
            "FOR EACH STATEMENT EXECUTE FUNCTION registry_notify_membership()"
        ),
    },
    # 0001.
    "compute_capabilities": {
        "compute_capabilities_notify": (
            "CREATE TRIGGER compute_capabilities_notify "
            "AFTER INSERT OR DELETE OR UPDATE ON public.compute_capabilities "
            "FOR EACH STATEMENT EXECUTE FUNCTION registry_notify_membership()"
        ),
    },
    # 0002 replaced 0001's statement-level peers_state_notify with these two.
    "peers": {
        "peers_membership_insert_delete": (
            "CREATE TRIGGER peers_membership_insert_delete "
            "AFTER INSERT OR DELETE ON public.peers "
            "FOR EACH ROW EXECUTE FUNCTION peers_notify_membership()"
        ),
        "peers_membership_update": (
            "CREATE TRIGGER peers_membership_update AFTER UPDATE ON public.peers "
            "FOR EACH ROW WHEN (((old.state IS DISTINCT FROM new.state) "
            "OR (old.address IS DISTINCT FROM new.address) "
            "OR (old.region IS DISTINCT FROM new.region))) "
            "EXECUTE FUNCTION peers_notify_membership()"
        ),
    },
    # 0002 replaced 0001's jobs_audit_and_notify trigger with these two.
    "jobs": {
        "jobs_audit_insert": (
            "CREATE TRIGGER jobs_audit_insert AFTER INSERT ON public.jobs "
            "FOR EACH ROW EXECUTE FUNCTION jobs_audit_and_notify()"
        ),
        "jobs_audit_update": (
            "CREATE TRIGGER jobs_audit_update AFTER UPDATE ON public.jobs "
            "FOR EACH ROW WHEN (((old.state IS DISTINCT FROM new.state) "
            "OR (old.attempt IS DISTINCT FROM new.attempt) "
            "OR (old.peer_id IS DISTINCT FROM new.peer_id))) "
            "EXECUTE FUNCTION jobs_audit_and_notify()"
        ),
    },
}

# The trigger functions: name -> (signature, language, body). Bodies are
# compared with runs of whitespace collapsed, so re-indenting a migration does
# not matter but any change to the code does.
FUNCTIONS: dict[str, tuple[str, str, str]] = {
    # 0001.
    "jobs_audit_and_notify": (
        "jobs_audit_and_notify() RETURNS trigger",
        "plpgsql",
        """
        BEGIN
            IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state
                    OR NEW.attempt IS DISTINCT FROM OLD.attempt
                    OR NEW.peer_id IS DISTINCT FROM OLD.peer_id THEN
                INSERT INTO job_events (job_id, attempt, from_state, to_state, peer_id, detail)
                VALUES (NEW.job_id, NEW.attempt,
                        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END,
                        NEW.state, NEW.peer_id, NEW.error);
                PERFORM pg_notify('anvil_job_events',
                    json_build_object('job_id', NEW.job_id, 'state', NEW.state,
                                      'attempt', NEW.attempt, 'peer_id', NEW.peer_id)::text);
                IF NEW.state = 'queued' AND NEW.peer_id IS NOT NULL THEN
                    PERFORM pg_notify('anvil_peer_' || replace(NEW.peer_id::text, '-', ''),
                                      NEW.job_id::text);
                END IF;
            END IF;
            RETURN NEW;
        END
        """,
    ),
    # 0001.
    "registry_notify_membership": (
        "registry_notify_membership() RETURNS trigger",
        "plpgsql",
        """
        BEGIN
            PERFORM pg_notify('anvil_membership', TG_TABLE_NAME);
            RETURN NULL;
        END
        """,
    ),
    # 0002.
    "peers_notify_membership": (
        "peers_notify_membership() RETURNS trigger",
        "plpgsql",
        """
        BEGIN
            PERFORM pg_notify('anvil_membership', 'peers');
            RETURN NULL;
        END
        """,
    ),
}

# Every relation in the public schema: name -> relkind (r table, i index,
# S sequence, v view, m materialized view, ...). Tables and indexes follow from
# the dicts above; the one sequence backs job_events.event_id's identity.
EXPECTED_SEQUENCES = {"job_events_event_id_seq"}

# --- reading the catalog ------------------------------------------------------


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    conn = psycopg.connect(url, autocommit=True)
    # Deparsed timestamptz constants (run_after's default) depend on these.
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET DateStyle = 'ISO, MDY'")
    return conn


def _query(url: str, query: str) -> list[tuple[Any, ...]]:
    with _connect(url) as conn:
        return conn.execute(query).fetchall()


def _nested(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    """Rows of (table, name, value) -> {table: {name: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for table, name, value in rows:
        out.setdefault(table, {})[name] = value
    return out


def _normalize(body: str) -> str:
    return re.sub(r"\s+", " ", body).strip()


# --- tests --------------------------------------------------------------------


def test_only_the_public_schema_and_plpgsql(database_url: str) -> None:
    schemas = _query(
        database_url,
        "SELECT nspname FROM pg_namespace "
        "WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' ORDER BY 1",
    )
    assert schemas == [("public",)]
    extensions = _query(database_url, "SELECT extname FROM pg_extension ORDER BY 1")
    assert extensions == [("plpgsql",)]


def test_relations(database_url: str) -> None:
    rows = _query(
        database_url,
        "SELECT relname, relkind::text FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace ORDER BY 1",
    )
    expected = (
        dict.fromkeys(COLUMNS, "r")
        | {index: "i" for indexes in INDEXES.values() for index in indexes}
        | dict.fromkeys(EXPECTED_SEQUENCES, "S")
    )
    assert dict(rows) == expected


def test_columns(database_url: str) -> None:
    rows = _query(
        database_url,
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
        """,
    )
    # No generated (computed) columns anywhere.
    assert {row[6] for row in rows} == {""}
    actual: dict[str, list[Column]] = {}
    for table, name, type_, not_null, default, identity, _generated in rows:
        actual.setdefault(table, []).append(Column(name, type_, not_null, default, identity))
    assert actual == COLUMNS


def test_columns_as_information_schema_reports_them(database_url: str) -> None:
    # The same pins through information_schema: nullability and defaults agree
    # with pg_catalog (a cross-check of the reading above, not a second source).
    rows = _query(
        database_url,
        """
        SELECT table_name, column_name, is_nullable, column_default, is_identity
        FROM information_schema.columns
        WHERE table_schema = 'public'
        ORDER BY table_name, ordinal_position
        """,
    )
    actual: dict[str, list[tuple[str, bool, str | None, bool]]] = {}
    for table, name, nullable, default, identity in rows:
        actual.setdefault(table, []).append((name, nullable == "NO", default, identity == "YES"))
    expected = {
        table: [(c.name, c.not_null, c.default, c.identity != "") for c in columns]
        for table, columns in COLUMNS.items()
    }
    assert actual == expected


def test_job_state_enum(database_url: str) -> None:
    types = _query(
        database_url,
        "SELECT typname, typtype::text FROM pg_type "
        "WHERE typnamespace = 'public'::regnamespace AND typtype NOT IN ('c') "
        "AND typname NOT LIKE '\\_%' ORDER BY 1",
    )
    # Besides the row types of the tables (typtype 'c') and array types: one enum.
    assert types == [("job_state", "e")]
    labels = _query(
        database_url,
        "SELECT enumlabel FROM pg_enum WHERE enumtypid = 'job_state'::regtype "
        "ORDER BY enumsortorder",
    )
    assert [label for (label,) in labels] == JOB_STATES


def test_constraints(database_url: str) -> None:
    rows = _query(
        database_url,
        """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace AND contype IN ('c', 'u', 'p', 'f', 'x')
        ORDER BY 1, 2
        """,
    )
    assert _nested(rows) == CONSTRAINTS


def test_no_constraint_is_deferrable_or_unvalidated(database_url: str) -> None:
    rows = _query(
        database_url,
        """
        SELECT conname FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace
          AND (condeferrable OR condeferred OR NOT convalidated)
        """,
    )
    assert rows == []


def test_indexes(database_url: str) -> None:
    rows = _query(
        database_url,
        "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' ORDER BY 1, 2",
    )
    assert _nested(rows) == INDEXES


def test_triggers(database_url: str) -> None:
    rows = _query(
        database_url,
        """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
        ORDER BY 1, 2
        """,
    )
    assert {row[3] for row in rows} == {"O"}, "every trigger fires (origin and local)"
    assert _nested([row[:3] for row in rows]) == TRIGGERS


def test_trigger_functions(database_url: str) -> None:
    rows = _query(
        database_url,
        """
        SELECT p.proname,
               p.proname || '(' || pg_get_function_arguments(p.oid) || ') RETURNS '
                   || pg_get_function_result(p.oid),
               l.lanname, p.prosrc
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = 'public'::regnamespace
        ORDER BY 1
        """,
    )
    actual = {name: (signature, lang, _normalize(src)) for name, signature, lang, src in rows}
    expected = {
        name: (signature, lang, _normalize(body))
        for name, (signature, lang, body) in FUNCTIONS.items()
    }
    assert actual == expected
