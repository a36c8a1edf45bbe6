/*
 * A cost probe, not a candidate guard: what the database guard's
 * same-token call would cost the server if it were C in an extension
 * instead of PL/pgSQL (issue 11; BENCHMARKS.md, "Parity with PgBouncer on
 * a fast day"). It takes the gate shared, reads the mark through the
 * primary key with a snapshot taken after the gate, and raises ZF001 when
 * the token is not the mark. It has no other path: no advance, no drain,
 * no `FOR SHARE` under REPEATABLE READ, no memo, no checks of the token's
 * form. Never install it where fencing matters.
 *
 *   make -C benches/guard_c_probe install     (postgresql-server-dev-15)
 *   bash benches/guard_cost.sh --guard-sql benches/guard_c_probe/swap.sql
 */
#include "postgres.h"
#include "fmgr.h"
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"

PG_MODULE_MAGIC;
PG_FUNCTION_INFO_V1(fp_guard_probe);

static Oid marks_oid = InvalidOid;
static Oid pkey_oid = InvalidOid;

Datum
fp_guard_probe(PG_FUNCTION_ARGS)
{
	text	   *res = PG_GETARG_TEXT_PP(0);
	text	   *tok = PG_GETARG_TEXT_PP(1);
	Datum		key2 = DirectFunctionCall1Coll(hashtext, DEFAULT_COLLATION_OID, PointerGetDatum(res));
	Relation	rel;
	ScanKeyData sk;
	SysScanDesc scan;
	HeapTuple	tup;
	Snapshot	snap;
	bool		same = false;

	DirectFunctionCall2(pg_advisory_xact_lock_shared_int4, Int32GetDatum(1717920355), key2);
	if (!OidIsValid(marks_oid))
		marks_oid = RangeVarGetRelid(makeRangeVar("fencepost", "marks", -1), NoLock, false);
	rel = table_open(marks_oid, AccessShareLock);
	if (!OidIsValid(pkey_oid))
		pkey_oid = RelationGetPrimaryKeyIndex(rel);
	ScanKeyInit(&sk, 1, BTEqualStrategyNumber, F_TEXTEQ, PointerGetDatum(res));
	sk.sk_collation = DEFAULT_COLLATION_OID;
	snap = RegisterSnapshot(GetLatestSnapshot());
	scan = systable_beginscan(rel, pkey_oid, true, snap, 1, &sk);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		t = heap_getattr(tup, 2, RelationGetDescr(rel), &isnull);

		if (!isnull)
		{
			text	   *mark = DatumGetTextPP(t);

			same = VARSIZE_ANY_EXHDR(mark) == VARSIZE_ANY_EXHDR(tok) &&
				memcmp(VARDATA_ANY(mark), VARDATA_ANY(tok), VARSIZE_ANY_EXHDR(tok)) == 0;
		}
	}
	systable_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, AccessShareLock);
	if (!same)
		ereport(ERROR, (errcode(MAKE_SQLSTATE('Z', 'F', '0', '0', '1')),
						errmsg("probe: not the mark")));
	PG_RETURN_VOID();
}
