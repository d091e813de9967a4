//! A transition's writes as one PostgreSQL statement: one round trip instead of one per
//! write plus `BEGIN` and `COMMIT`.
//!
//! Each write becomes a data-modifying CTE (`wN AS (… RETURNING 1)`); PostgreSQL runs every
//! one of them, in one snapshot, as one statement, which commits or rolls back whole. Sibling
//! CTEs run in an order PostgreSQL leaves open, so each write is made to read the one before
//! it (`FROM (SELECT count(*) FROM wN-1)`, a single row): they run in the plan's order, and
//! rows of one table get their ids in that order (the audit log reads in id order). What a
//! write had to achieve ([`IfNone::Stop`], [`IfNone::Fail`]) is checked by the final
//! `SELECT`, in the writes' order: the first that touched no row calls `payretry_stop`
//! (migration 0010), whose error aborts the statement, so none of the writes stays, exactly
//! as when the transaction of separate statements was rolled back. The row locks are the
//! same as before: the compare-and-set `UPDATE` still waits for a concurrent writer of the
//! session and re-checks `version`, and `ON CONFLICT` still waits for a concurrent insert of
//! the same key.

use super::sql::{Arg, IfNone, Refusal, Write};
use super::{Committed, StorageError};

/// One statement and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statement {
    pub sql: String,
    pub args: Vec<Arg>,
}

/// The prefix of the error message `payretry_stop` raises.
const STOP: &str = "payretry_stop:";

/// `writes` as one statement (see the module doc). The placeholders of each write are
/// renumbered after those of the writes before it.
pub(crate) fn combine(writes: &[Write]) -> Statement {
    let mut sql = String::from("WITH ");
    let mut args = Vec::new();
    for (n, write) in writes.iter().enumerate() {
        if n > 0 {
            sql.push_str(",\n");
        }
        sql.push_str(&format!("w{n} AS ("));
        let mut renumbered = String::new();
        renumber(write.sql, args.len(), &mut renumbered);
        match n.checked_sub(1) {
            Some(previous) => sql.push_str(&after(&renumbered, previous)),
            None => sql.push_str(&renumbered),
        }
        sql.push_str(" RETURNING 1)");
        args.extend(write.args.iter().cloned());
    }
    let checks: Vec<String> = writes
        .iter()
        .enumerate()
        .filter_map(|(n, write)| {
            outcome_name(write.if_none).map(|name| {
                format!("WHEN NOT EXISTS (SELECT FROM w{n}) THEN payretry_stop('{name}')")
            })
        })
        .collect();
    if checks.is_empty() {
        sql.push_str("\nSELECT 0");
    } else {
        sql.push_str(&format!("\nSELECT CASE {} ELSE 0 END", checks.join(" ")));
    }
    Statement { sql, args }
}

/// What an error of the combined statement means: `Some` when `payretry_stop` ended it (a
/// write that touched no row), `None` for any other failure.
pub(crate) fn stopped(error: &sqlx::Error) -> Option<Result<Committed, StorageError>> {
    let message = error.as_database_error()?.message();
    let name = message.strip_prefix(STOP)?;
    Some(match name {
        "conflict" => Ok(Committed::Conflict),
        "duplicate_event" => Ok(Committed::DuplicateEvent),
        "idempotency_key_taken" => Err(StorageError::IdempotencyKeyTaken),
        other => Err(StorageError::Corrupt(format!("unknown stop {other}"))),
    })
}

/// The name `payretry_stop` is called with when a write with `if_none` touched no row.
fn outcome_name(if_none: IfNone) -> Option<&'static str> {
    match if_none {
        IfNone::Continue => None,
        IfNone::Stop(Committed::Conflict) => Some("conflict"),
        IfNone::Stop(Committed::DuplicateEvent) => Some("duplicate_event"),
        // Never planned: a write that must touch a row says what it means when it does not.
        IfNone::Stop(Committed::Applied) => None,
        IfNone::Fail(Refusal::IdempotencyKeyTaken) => Some("idempotency_key_taken"),
    }
}

/// `sql` made to run after the CTE `w{previous}`: it reads that CTE's one-row count, so
/// PostgreSQL must finish `w{previous}` first. An `INSERT … VALUES (…)` becomes
/// `INSERT … SELECT … FROM (…)`, an `UPDATE` gains a `FROM`, a `DELETE` a `USING`.
fn after(sql: &str, previous: usize) -> String {
    let gate = format!("(SELECT count(*) FROM w{previous}) AS w{previous}_done");
    let keyword = sql.split_whitespace().next().unwrap_or_default();
    match keyword {
        "INSERT" => {
            let values = sql.find("VALUES (").expect("an INSERT … VALUES (…)");
            let open = values + "VALUES ".len();
            let close = closing_paren(sql, open);
            format!(
                "{}SELECT {} FROM {gate}{}",
                &sql[..values],
                &sql[open + 1..close],
                &sql[close + 1..]
            )
        }
        "UPDATE" | "DELETE" => {
            let join = if keyword == "UPDATE" { "FROM" } else { "USING" };
            let condition = sql.find("WHERE").expect("an UPDATE or DELETE with a WHERE");
            format!(
                "{} {join} {gate} {}",
                sql[..condition].trim_end(),
                &sql[condition..]
            )
        }
        other => panic!("a write is an INSERT, UPDATE or DELETE, not {other}"),
    }
}

/// The index of the `)` that closes the `(` at `open`.
fn closing_paren(sql: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in sql[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {sql}")
}

/// Appends `sql` to `out` with every `$n` written as `$(n + offset)`.
fn renumber(sql: &str, offset: usize, out: &mut String) {
    replace_placeholders(sql, out, |n| format!("${}", n + offset));
}

/// `statement` with every `$n` replaced by `literal(n-th argument)`: the SQL text a tool
/// without binds (`pgbench`) can run. Used only by `payretry-bench`'s S2p ceiling.
pub(crate) fn with_literals(statement: &Statement, literal: impl Fn(&Arg) -> String) -> String {
    let mut out = String::new();
    replace_placeholders(&statement.sql, &mut out, |n| {
        literal(&statement.args[n - 1])
    });
    out
}

/// Appends `sql` to `out` with every `$n` written as `placeholder(n)`.
fn replace_placeholders(sql: &str, out: &mut String, placeholder: impl Fn(usize) -> String) {
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            let n: usize = rest[..digits].parse().expect("digits");
            out.push_str(&placeholder(n));
            rest = &rest[digits..];
        } else {
            out.push('$');
        }
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_after_the_writes_before() {
        let writes = [
            Write::new("INSERT INTO a VALUES ($1, $2, $1)", [1.into(), 2.into()]),
            Write::new("UPDATE b SET x = $2 WHERE y = $1", [3.into(), 4.into()]),
            Write::new("DELETE FROM c WHERE id = $1", [5.into()]),
        ];
        let combined = combine(&writes);
        assert!(
            combined
                .sql
                .contains("w0 AS (INSERT INTO a VALUES ($1, $2, $1) RETURNING 1)")
        );
        assert!(
            combined
                .sql
                .contains("w1 AS (UPDATE b SET x = $4 FROM (SELECT count(*) FROM w0) AS w0_done WHERE y = $3 RETURNING 1)")
        );
        assert!(
            combined
                .sql
                .contains("w2 AS (DELETE FROM c USING (SELECT count(*) FROM w1) AS w1_done WHERE id = $5 RETURNING 1)")
        );
        let args: Vec<Arg> = (1..=5).map(|n: i64| n.into()).collect();
        assert_eq!(combined.args, args);
    }

    #[test]
    fn the_first_write_that_missed_decides_in_the_writes_order() {
        let writes = [
            Write::new("INSERT INTO e VALUES ($1)", [1.into()])
                .or(IfNone::Stop(Committed::DuplicateEvent)),
            Write::new("UPDATE s SET v = v + 1 WHERE v = $1", [1.into()])
                .or(IfNone::Stop(Committed::Conflict)),
            Write::new("INSERT INTO a VALUES ($1)", [1.into()]),
            Write::new("INSERT INTO k VALUES ($1)", [1.into()])
                .or(IfNone::Fail(Refusal::IdempotencyKeyTaken)),
        ];
        let sql = combine(&writes).sql;
        let select = sql.split("\nSELECT ").nth(1).expect("a final select");
        assert_eq!(
            select,
            "CASE WHEN NOT EXISTS (SELECT FROM w0) THEN payretry_stop('duplicate_event') \
             WHEN NOT EXISTS (SELECT FROM w1) THEN payretry_stop('conflict') \
             WHEN NOT EXISTS (SELECT FROM w3) THEN payretry_stop('idempotency_key_taken') \
             ELSE 0 END"
        );
    }

    #[test]
    fn each_write_reads_the_one_before_so_they_run_in_order() {
        let writes = [
            Write::new("INSERT INTO a (x) VALUES ($1)", [1.into()]),
            Write::new(
                "INSERT INTO a (x, y) VALUES ($1, COALESCE($2, 0)) ON CONFLICT (x) DO NOTHING",
                [2.into(), 3.into()],
            ),
        ];
        let expected = "w1 AS (INSERT INTO a (x, y) SELECT $2, COALESCE($3, 0) FROM \
                        (SELECT count(*) FROM w0) AS w0_done ON CONFLICT (x) DO NOTHING \
                        RETURNING 1)";
        assert!(combine(&writes).sql.contains(expected));
    }

    #[test]
    fn literals_take_the_place_of_every_placeholder() {
        let writes = [
            Write::new("INSERT INTO a VALUES ($1, $2)", [1.into(), "x".into()]),
            Write::new("UPDATE b SET x = $1 WHERE y = $1", [3.into()]),
        ];
        let sql = with_literals(&combine(&writes), |arg| match arg {
            Arg::Int(Some(n)) => format!("<{n}>"),
            other => format!("<{other:?}>"),
        });
        assert!(sql.contains("VALUES (<1>, <Text(Some(\"x\"))>)"));
        assert!(sql.contains("SET x = <3> FROM"));
        assert!(sql.contains("WHERE y = <3>"));
        assert!(!sql.contains('$'));
    }

    #[test]
    fn writes_with_nothing_to_check_end_in_a_plain_select() {
        let writes = [
            Write::new("INSERT INTO a VALUES ($1)", [1.into()]),
            Write::new("INSERT INTO b VALUES ($1)", [2.into()]),
        ];
        assert!(combine(&writes).sql.ends_with("\nSELECT 0"));
    }
}
