"""capture: every committed row change out of PostgreSQL, exactly once, without long transactions.

Modules, in the order a change passes through them:
- `setup`: checks the source and creates the publication and the pgoutput slot;
- `stream`: the replication connection, whole transactions of `Change`s (`pgoutput` decodes);
- `rowstore`: the sink, `pgfresh.rows` + the change log `pgfresh.changes`, and snapshot chunks;
- `sync`: the loop that drives them (`pgfresh sync`), reconnecting when the source goes away;
- `resync`: recovery from a lost slot (`pgfresh resync`): new slot, new snapshot, deletes of what is gone;
- `change`: the `Change` record and the consumer API later stages read the change log with.
"""

from pgfresh.capture.change import Change, advance, read_changes

__all__ = ["Change", "read_changes", "advance"]
