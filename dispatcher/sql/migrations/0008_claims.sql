-- Several control planes share the work: a job being published ('releasing') is claimed
-- by one of them (claimed_by) under a lease its owner renews (claimed_at). Before each
-- batch of ranges it publishes, the owner records how far the publication goes
-- (published_upto, an event number), in the same statement that checks its lease. A
-- control plane that takes a job over (its lease ran out) publishes only what comes
-- after: what the first one published is not published twice.
ALTER TABLE jobs ADD COLUMN claimed_by text;
ALTER TABLE jobs ADD COLUMN published_upto bigint;
