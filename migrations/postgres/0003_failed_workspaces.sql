-- A workspace that failed (it crashed more often than the restart policy
-- allows, or could not be restarted) is failed for the whole cluster, not
-- only on the node where it failed: a node about to activate a key reads
-- this row first and refuses while until_at is in the future. The row
-- goes when an operator resets the key (on any node) or is ignored once
-- until_at has passed. Times are ms since the Unix epoch, database clock.
CREATE TABLE failed_workspaces (
    project_id BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    branch     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    server_tag TEXT NOT NULL,
    failed_at  BIGINT NOT NULL,
    until_at   BIGINT NOT NULL,
    PRIMARY KEY (project_id, branch)
);
