-- Room in every page of events for the new versions of its rows: an event is updated two
-- or three times (queued, running, finished), and an update that finds room in its page
-- is HOT (no index entry to add). Full pages made every update a new index entry in
-- two indexes. Applies to pages written from now on.
ALTER TABLE events SET (fillfactor = 50);
