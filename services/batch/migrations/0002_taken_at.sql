-- When a worker took the item's current message (NULL: published, not taken yet). A lease that
-- expires after a take means the worker died on it, which counts as an attempt; one that expires
-- before any take means the message was lost or no worker was up, which does not.
ALTER TABLE items ADD COLUMN IF NOT EXISTS taken_at timestamptz;
