-- Several control planes share the work: a job being published ('releasing') is claimed
-- by one of them (claimed_by) under a lease its owner renews (claimed_at). The owner checks
-- its lease before each batch of ranges it publishes, and another control plane takes the
-- job over only once the lease has run out.
ALTER TABLE jobs ADD COLUMN claimed_by text;
