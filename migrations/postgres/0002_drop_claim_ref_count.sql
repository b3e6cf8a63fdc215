-- The claim row no longer carries a reference count. It was recounted from
-- websocket_sessions under a row lock on every connect and disconnect, and
-- nothing read it: garbage collection goes by the allocator's in-memory
-- sessions, and the cluster-wide view of who is connected is the
-- websocket_sessions rows themselves. time_zeroed was only ever written
-- with the count.
ALTER TABLE git_actor_sessions DROP COLUMN ref_count;
ALTER TABLE git_actor_sessions DROP COLUMN time_zeroed;
