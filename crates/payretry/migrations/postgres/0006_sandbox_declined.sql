-- A declined sandbox checkout is closed (SQLite's column has no CHECK).
ALTER TABLE sandbox_checkouts DROP CONSTRAINT sandbox_checkouts_status_check;
ALTER TABLE sandbox_checkouts ADD CONSTRAINT sandbox_checkouts_status_check
    CHECK (status IN ('open', 'paid', 'declined', 'expired', 'refunded'));
