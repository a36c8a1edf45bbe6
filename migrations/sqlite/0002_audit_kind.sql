-- One audit log for refused writes and leadership changes: `kind` tells
-- them apart (rows written before it are refused writes), `holder` names
-- the lease holder a leadership record is about.
ALTER TABLE audit ADD COLUMN kind TEXT NOT NULL DEFAULT 'refused_write';
ALTER TABLE audit ADD COLUMN holder TEXT;

CREATE INDEX audit_kind_id ON audit (kind, id);
