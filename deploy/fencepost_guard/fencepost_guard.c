/*
 * fencepost_guard: `fencepost.advance_fast`, guard mode's guard call with
 * its same-token check in C. A proxy with `[[postgres]] guard_extension =
 * true` calls it in place of `fencepost.advance` (migrations/guard/).
 *
 * Why C: the same-token check is the only thing guard mode adds to a
 * leader's ordinary transaction, and as PL/pgSQL it costs the server
 * 66,000-70,000 instructions a transaction (callgrind, pgbench TPC-B-like;
 * benches/guard_cost.sh), 21.7 % of the whole transaction under `-M
 * prepared`, which is what holds guard mode under 0.9 of proxy mode there
 * (BENCHMARKS.md). Of that, the PL/pgSQL call is 46,000: the interpreter,
 * its exception block (a subtransaction) and the read of the mark through
 * SPI. Here the same steps cost about half (the C cost probe counted them
 * the same way: 34,600-37,400, most of it the statement that calls the
 * function).
 *
 * What it does, in the order `fencepost.advance`'s fast path does it:
 *   1. Under READ COMMITTED only (REPEATABLE READ and SERIALIZABLE need
 *      `FOR SHARE` on the mark; they go to `fencepost.advance` whole), take
 *      the gate shared: the transaction-level advisory lock
 *      (1717920355, hashtext(resource)), the lock
 *      `pg_advisory_xact_lock_shared(int4, int4)` takes.
 *   2. Read the mark through the primary key with a snapshot taken after
 *      the gate is held, as READ COMMITTED's next statement would.
 *   3. The token is the mark: return, holding the gate until the
 *      transaction ends. An advance needs the gate exclusive, so the mark
 *      cannot move before this transaction ends.
 *   4. Anything else (a newer token, no mark yet, a stale token, a second
 *      token in one transaction, the guard not installed): release the
 *      gate this call took (not one an earlier call took: the lock
 *      manager counts each acquisition) and call `fencepost.advance` with
 *      the same arguments, which decides every such case as it does
 *      without this extension, with the same errors. Releasing first keeps
 *      the rule that a newer token never asks for the gate exclusive while
 *      its own call holds it shared (no lock upgrade).
 *
 * Nothing here writes, and nothing is cached across calls: a dropped and
 * re-made guard is found again by name. A role without `SELECT` on
 * `fencepost.marks` is handed on too, so it meets `fencepost.advance`'s
 * own permission error rather than an answer from here.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#if PG_VERSION_NUM >= 160000
#include "catalog/pg_proc.h"
#endif

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(fencepost_advance_fast);

/* The gate's key space, as in migrations/guard/ (`gate_ns`). */
#define GATE_NS 1717920355

/* Whether `tok` is the mark of `res`, read after the gate is held. */
static bool
is_the_mark(text *res, text *tok)
{
	Relation	rel;
	TupleDesc	desc;
	AttrNumber	res_att = InvalidAttrNumber;
	AttrNumber	tok_att = InvalidAttrNumber;
	Oid			pkey;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Snapshot	snap;
	bool		same = false;

	rel = table_openrv_extended(makeRangeVar("fencepost", "marks", -1),
								AccessShareLock, true);
	if (rel == NULL)
		return false;
	/*
	 * A role that may not read the marks gets `fencepost.advance`'s own
	 * 42501, not an answer from here.
	 */
	if (pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_SELECT) != ACLCHECK_OK)
	{
		table_close(rel, AccessShareLock);
		return false;
	}
	desc = RelationGetDescr(rel);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped)
			continue;
		if (strcmp(NameStr(att->attname), "resource") == 0)
			res_att = att->attnum;
		else if (strcmp(NameStr(att->attname), "token") == 0)
			tok_att = att->attnum;
	}
	pkey = RelationGetPrimaryKeyIndex(rel);
	if (res_att == InvalidAttrNumber || tok_att == InvalidAttrNumber ||
		!OidIsValid(pkey))
	{
		table_close(rel, AccessShareLock);
		return false;
	}
	ScanKeyInit(&key, res_att, BTEqualStrategyNumber, F_TEXTEQ,
				PointerGetDatum(res));
	key.sk_collation = TupleDescAttr(desc, res_att - 1)->attcollation;
	snap = RegisterSnapshot(GetLatestSnapshot());
	scan = systable_beginscan(rel, pkey, true, snap, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, tok_att, desc, &isnull);

		if (!isnull)
		{
			text	   *mark = DatumGetTextPP(d);

			same = VARSIZE_ANY_EXHDR(mark) == VARSIZE_ANY_EXHDR(tok) &&
				memcmp(VARDATA_ANY(mark), VARDATA_ANY(tok),
					   VARSIZE_ANY_EXHDR(tok)) == 0;
		}
	}
	systable_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, AccessShareLock);
	return same;
}

/*
 * `fencepost.advance(text, text, integer)` with the caller's arguments:
 * every case but the same-token one. Looked up by name on each call (this
 * path is rare: a leader's first transaction, a refusal).
 */
static Datum
advance_in_sql(FunctionCallInfo fcinfo)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, INT4OID};
	List	   *name = list_make2(makeString(pstrdup("fencepost")),
								  makeString(pstrdup("advance")));
	Oid			fn = LookupFuncName(name, 3, argtypes, false);
	AclResult	acl;
	FmgrInfo	flinfo;

	LOCAL_FCINFO(call, 3);

#if PG_VERSION_NUM >= 160000
	acl = object_aclcheck(ProcedureRelationId, fn, GetUserId(), ACL_EXECUTE);
#else
	acl = pg_proc_aclcheck(fn, GetUserId(), ACL_EXECUTE);
#endif
	if (acl != ACLCHECK_OK)
		aclcheck_error(acl, OBJECT_FUNCTION, "fencepost.advance");
	fmgr_info(fn, &flinfo);
	InitFunctionCallInfoData(*call, &flinfo, 3, PG_GET_COLLATION(), NULL, NULL);
	for (int i = 0; i < 3; i++)
		call->args[i] = fcinfo->args[i];
	(void) FunctionCallInvoke(call);
	PG_RETURN_VOID();
}

Datum
fencepost_advance_fast(PG_FUNCTION_ARGS)
{
	text	   *res;
	text	   *tok;
	int32		hash;
	LOCKTAG		gate;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || IsolationUsesXactSnapshot() ||
		IsInParallelMode())
		return advance_in_sql(fcinfo);
	res = PG_GETARG_TEXT_PP(0);
	tok = PG_GETARG_TEXT_PP(1);
	hash = DatumGetInt32(DirectFunctionCall1Coll(hashtext, DEFAULT_COLLATION_OID,
												 PointerGetDatum(res)));
	/* pg_advisory_xact_lock_shared(int4, int4)'s lock: field 4 is 2. */
	SET_LOCKTAG_ADVISORY(gate, MyDatabaseId, (uint32) GATE_NS, (uint32) hash, 2);
	(void) LockAcquire(&gate, ShareLock, false, false);
	if (is_the_mark(res, tok))
		PG_RETURN_VOID();
	LockRelease(&gate, ShareLock, false);
	return advance_in_sql(fcinfo);
}
