-- branchd's data model (see DESIGN.md). Times are BIGINT ms since the Unix
-- epoch from the database clock; booleans are 0/1 so one set of queries
-- serves SQLite and Postgres alike.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    email         TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    is_admin      BIGINT NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at    BIGINT NOT NULL
);

CREATE TABLE auth_sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX auth_sessions_expires_at ON auth_sessions (expires_at);

CREATE TABLE projects (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    created_by BIGINT REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE project_members (
    project_id BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'owner')),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_members_user ON project_members (user_id);

CREATE TABLE git_snapshots (
    project_id  BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    branch      TEXT NOT NULL,
    version     BIGINT NOT NULL,
    data        BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    journal_seq BIGINT NOT NULL DEFAULT 0,
    author      TEXT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, branch, version)
);

CREATE TABLE git_actor_sessions (
    project_id  BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    branch      TEXT NOT NULL,
    server_tag  TEXT,
    epoch       BIGINT NOT NULL,
    ref_count   BIGINT NOT NULL DEFAULT 0,
    time_zeroed BIGINT,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, branch)
);
CREATE INDEX git_actor_sessions_server_tag ON git_actor_sessions (server_tag);

CREATE TABLE websocket_sessions (
    id           TEXT PRIMARY KEY,
    user_id      BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    project_id   BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    branch       TEXT NOT NULL,
    server_tag   TEXT NOT NULL,
    connected_at BIGINT NOT NULL
);
CREATE INDEX websocket_sessions_key ON websocket_sessions (project_id, branch);
CREATE INDEX websocket_sessions_server_tag ON websocket_sessions (server_tag);

CREATE TABLE journal (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    branch     TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    op         BLOB NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX journal_key_seq ON journal (project_id, branch, seq);

CREATE TABLE nodes (
    server_tag   TEXT PRIMARY KEY,
    cluster_addr TEXT,
    http_addr    TEXT,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
