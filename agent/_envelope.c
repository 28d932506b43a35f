/*
 * agent._envelope: the hashing and splicing of EntityBuilder.build in C (optional).
 *
 * What it computes is defined by agent/records.py: splice_python there is the reference,
 * with the same signature, and tests/test_records_builder.py and test_records_golden.py
 * hold this module to the same bytes (golden envelopes and random inputs). The agent
 * runs without this module (pure Python); with it, building an entity version costs
 * about 40% as much (docs/sql-sources.md, "Performance").
 *
 * build() returns (entity_id, content_hash, id, envelope_json):
 *
 *   entity_id    = uuid5 text of sha1(ns + name_prefix + remote_id (UTF-8))
 *   content_hash = "sha256:" + hex sha256('{"custom":' c ',"data":' d ',"op":' op
 *                  ',"remote_data":' (r or null) '}')
 *   id           = uuid5 text of sha1(ns + entity_id + ":" + content_hash), provisional
 *   envelope     = the canonical JSON of the record (sorted keys), spliced from the
 *                  parts the caller encoded (orjson) and the three values above.
 *
 * link() is the outbox writer's loop over one append (records.link_python is its
 * reference): per entity version, dedupe against the entity's last version, then the
 * chained id uuid5(ns, entity_id + ":" + content_hash + ":" + prev), once it has checked
 * that the envelope holds the provisional id where the builder said (the writer then
 * writes the chained id there).
 *
 * Digests come from OpenSSL's libcrypto (EVP), the library CPython's hashlib uses.
 * The caller holds the GIL throughout and nothing here calls back into Python, so one
 * digest context per process is reused without locking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>

static const EVP_MD *md_sha1;
static const EVP_MD *md_sha256;
static EVP_MD_CTX *ctx;
static const char HEX[] = "0123456789abcdef";

typedef struct {
    const char *p;
    Py_ssize_t n;
} part;

static int
digest(const EVP_MD *md, const part *parts, int count, unsigned char *out)
{
    unsigned int len = 0;
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1)
        return -1;
    for (int i = 0; i < count; i++) {
        if (parts[i].n && EVP_DigestUpdate(ctx, parts[i].p, (size_t)parts[i].n) != 1)
            return -1;
    }
    return EVP_DigestFinal_ex(ctx, out, &len) == 1 ? 0 : -1;
}

static void
hex(const unsigned char *in, int n, char *out)
{
    for (int i = 0; i < n; i++) {
        out[2 * i] = HEX[in[i] >> 4];
        out[2 * i + 1] = HEX[in[i] & 15];
    }
}

/* The uuid5 text (36 characters) of a SHA-1 digest: version 5, RFC 4122 variant. */
static void
uuid5_text(unsigned char *d, char *out)
{
    d[6] = (unsigned char)((d[6] & 0x0f) | 0x50);
    d[8] = (unsigned char)((d[8] & 0x3f) | 0x80);
    hex(d, 4, out);
    out[8] = '-';
    hex(d + 4, 2, out + 9);
    out[13] = '-';
    hex(d + 6, 2, out + 14);
    out[18] = '-';
    hex(d + 8, 2, out + 19);
    out[23] = '-';
    hex(d + 10, 6, out + 24);
}

#define LIT(s) {s, (Py_ssize_t)(sizeof(s) - 1)}

static int
bytes_arg(PyObject *o, const char *fn, const char *name, part *out)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must be bytes, not %.80s", fn, name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    out->p = PyBytes_AS_STRING(o);
    out->n = PyBytes_GET_SIZE(o);
    return 0;
}

static PyObject *
ascii_str(const char *s, Py_ssize_t n)
{
    PyObject *u = PyUnicode_New(n, 127);
    if (u != NULL)
        memcpy(PyUnicode_1BYTE_DATA(u), s, (size_t)n);
    return u;
}

/*
 * build(ns, name_prefix, remote_id, remote_id_json, op_json, data, custom, remote_data,
 *       mid, precision, observed_json, src, modified_json)
 *
 * All bytes. ns: the 16 namespace bytes; name_prefix: b"source:type:"; remote_id: its
 * UTF-8 (the caller encodes it, so a bad one fails as in Python); remote_data: or None;
 * mid, precision, src: the builder's constant envelope pieces (see records.py).
 */
static PyObject *
build(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char *names[] = {
        "ns", "name_prefix", "remote_id", "remote_id_json", "op_json", "data", "custom",
        "remote_data", "mid", "precision", "observed_json", "src", "modified_json",
    };
    part a[13];
    unsigned char sha1_out[EVP_MAX_MD_SIZE], sha256_out[EVP_MAX_MD_SIZE];
    char eid[36], rid[36], chash[71];
    int has_remote;

    (void)self;
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "build() takes 13 arguments (%zd given)", nargs);
        return NULL;
    }
    has_remote = args[7] != Py_None;
    for (int i = 0; i < 13; i++) {
        if (i == 7 && !has_remote)
            continue;
        if (bytes_arg(args[i], "build", names[i], &a[i]) < 0)
            return NULL;
    }
    if (a[0].n != 16) {
        PyErr_SetString(PyExc_ValueError, "build(): ns must be 16 bytes");
        return NULL;
    }
    {
        part p[] = {a[0], a[1], a[2]};
        if (digest(md_sha1, p, 3, sha1_out) < 0)
            goto ssl_error;
        uuid5_text(sha1_out, eid);
    }
    {
        part null = LIT("null");
        part p[] = {
            LIT("{\"custom\":"), a[6], LIT(",\"data\":"), a[5], LIT(",\"op\":"), a[4],
            LIT(",\"remote_data\":"), has_remote ? a[7] : null, LIT("}"),
        };
        if (digest(md_sha256, p, 9, sha256_out) < 0)
            goto ssl_error;
        memcpy(chash, "sha256:", 7);
        hex(sha256_out, 32, chash + 7);
    }
    {
        part p[] = {a[0], {eid, 36}, LIT(":"), {chash, 71}};
        if (digest(md_sha1, p, 4, sha1_out) < 0)
            goto ssl_error;
        uuid5_text(sha1_out, rid);
    }

    {
        part remote_key = has_remote ? (part)LIT(",\"remote_data\":") : (part){"", 0};
        part remote_val = has_remote ? a[7] : (part){"", 0};
        part body[] = {
            LIT("{\"content_hash\":\""), {chash, 71},
            LIT("\",\"custom\":"), a[6],
            LIT(",\"data\":"), a[5],
            LIT(",\"entity_id\":\""), {eid, 36}, a[8], {rid, 36}, a[9],
            a[10],
            LIT(",\"op\":"), a[4],
            remote_key, remote_val,
            LIT(",\"remote_id\":"), a[3],
            a[11], a[12],
            LIT("}"),
        };
        const int count = (int)(sizeof(body) / sizeof(body[0]));
        Py_ssize_t total = 0;
        PyObject *out, *tuple, *e = NULL, *c = NULL, *r = NULL;
        char *w;

        for (int i = 0; i < count; i++)
            total += body[i].n;
        out = PyBytes_FromStringAndSize(NULL, total);
        if (out == NULL)
            return NULL;
        w = PyBytes_AS_STRING(out);
        for (int i = 0; i < count; i++) {
            memcpy(w, body[i].p, (size_t)body[i].n);
            w += body[i].n;
        }
        tuple = PyTuple_New(4);
        if (tuple == NULL || (e = ascii_str(eid, 36)) == NULL ||
            (c = ascii_str(chash, 71)) == NULL || (r = ascii_str(rid, 36)) == NULL) {
            Py_XDECREF(e);
            Py_XDECREF(c);
            Py_XDECREF(tuple);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, 0, e); /* steals the references */
        PyTuple_SET_ITEM(tuple, 1, c);
        PyTuple_SET_ITEM(tuple, 2, r);
        PyTuple_SET_ITEM(tuple, 3, out);
        return tuple;
    }

ssl_error:
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
    return NULL;
}

/* A str argument's UTF-8 (for ASCII text, CPython's own buffer: no copy). */
static int
str_arg(PyObject *o, const char *fn, const char *name, part *out)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must be str, not %.80s", fn, name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    out->p = PyUnicode_AsUTF8AndSize(o, &out->n);
    return out->p == NULL ? -1 : 0;
}

/*
 * The chained id of one version, into rid (36 characters): 1; 0 when the 36 bytes of
 * body at `at` are not `provisional` (nothing is computed); -1 with an exception set.
 */
static int
chain_text(const part *ns, PyObject *eid_o, PyObject *chash_o, PyObject *prev_o,
           PyObject *body_o, PyObject *at_o, PyObject *provisional_o, const char *fn,
           char *rid)
{
    part eid, chash, prev, body, provisional;
    unsigned char sha1_out[EVP_MAX_MD_SIZE];
    Py_ssize_t at;

    if (str_arg(eid_o, fn, "entity_id", &eid) < 0 ||
        str_arg(chash_o, fn, "content_hash", &chash) < 0 ||
        str_arg(prev_o, fn, "prev", &prev) < 0 || bytes_arg(body_o, fn, "body", &body) < 0 ||
        str_arg(provisional_o, fn, "provisional", &provisional) < 0)
        return -1;
    at = PyLong_AsSsize_t(at_o);
    if (at == -1 && PyErr_Occurred())
        return -1;
    if (provisional.n != 36 || at < 0 || at > body.n - 36 ||
        memcmp(body.p + at, provisional.p, 36) != 0)
        return 0;
    {
        part p[] = {*ns, eid, LIT(":"), chash, LIT(":"), prev};
        if (digest(md_sha1, p, 6, sha1_out) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
            return -1;
        }
        uuid5_text(sha1_out, rid);
    }
    return 1;
}

static int
ns_arg(PyObject *o, const char *fn, part *out)
{
    if (bytes_arg(o, fn, "ns", out) < 0)
        return -1;
    if (out->n != 16) {
        PyErr_Format(PyExc_ValueError, "%s(): ns must be 16 bytes", fn);
        return -1;
    }
    return 0;
}

/*
 * One version of link(): `row` (8-tuple) chained from `prev`; appends the new row (the id
 * in front) to keep and the id to ids, and sets latest[entity] = (digest, id).
 */
static int
link_one(const part *ns, PyObject *row, PyObject *entity, PyObject *digest, PyObject *chash,
         PyObject *prev, PyObject *keep, PyObject *ids, PyObject *latest)
{
    char text[36];
    PyObject *rid, *fresh, *pair;
    int got, failed;

    got = chain_text(ns, PyTuple_GET_ITEM(row, 1), chash, prev, PyTuple_GET_ITEM(row, 6),
                     PyTuple_GET_ITEM(row, 7), PyTuple_GET_ITEM(row, 0), "link", text);
    if (got <= 0) {
        if (got == 0)
            PyErr_Format(PyExc_ValueError, "envelope of %R has no provisional id where the "
                         "builder said", entity);
        return -1;
    }
    if ((rid = ascii_str(text, 36)) == NULL)
        return -1;
    if ((fresh = PyTuple_New(8)) == NULL) {
        Py_DECREF(rid);
        return -1;
    }
    Py_INCREF(rid);
    PyTuple_SET_ITEM(fresh, 0, rid);
    for (Py_ssize_t k = 1; k < 8; k++) {
        PyObject *item = PyTuple_GET_ITEM(row, k);
        Py_INCREF(item);
        PyTuple_SET_ITEM(fresh, k, item);
    }
    pair = PyTuple_Pack(2, digest, rid);
    failed = pair == NULL || PyList_Append(keep, fresh) < 0 || PyList_Append(ids, rid) < 0 ||
             PyDict_SetItem(latest, entity, pair) < 0;
    Py_XDECREF(pair);
    Py_DECREF(fresh);
    Py_DECREF(rid);
    return failed ? -1 : 0;
}

/*
 * link(ns, epoch, rows, versions, known, latest) -> (kept rows, ids, unchanged)
 *
 * The outbox writer's loop over one append (records.link_python is the reference).
 * rows: list of 8-tuples; versions: a list as long, of None (a reading: kept as it is)
 * or (entity, digest, content_hash); known and latest: dicts entity -> (digest, last id
 * or None), latest first; latest is updated. A version whose digest is its entity's
 * last is dropped (id None); the others are chained from the last id, or the epoch.
 */
static PyObject *
link_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    part ns;
    PyObject *epoch, *rows, *versions, *known, *latest, *keep, *ids;
    Py_ssize_t n, unchanged = 0;

    (void)self;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "link() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (ns_arg(args[0], "link", &ns) < 0)
        return NULL;
    epoch = args[1];
    rows = args[2];
    versions = args[3];
    known = args[4];
    latest = args[5];
    if (!PyUnicode_Check(epoch) || !PyList_Check(rows) || !PyList_Check(versions) ||
        !PyDict_Check(known) || !PyDict_Check(latest)) {
        PyErr_SetString(PyExc_TypeError, "link(): (bytes, str, list, list, dict, dict)");
        return NULL;
    }
    n = PyList_GET_SIZE(rows);
    if (PyList_GET_SIZE(versions) != n) {
        PyErr_SetString(PyExc_ValueError, "link(): rows and versions differ in length");
        return NULL;
    }
    keep = PyList_New(0);
    ids = PyList_New(0);
    if (keep == NULL || ids == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i), *version = PyList_GET_ITEM(versions, i);
        PyObject *entity, *last, *prev = epoch;

        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 8) {
            PyErr_SetString(PyExc_TypeError, "link(): a row is an 8-tuple");
            goto fail;
        }
        if (version == Py_None) {
            if (PyList_Append(keep, row) < 0 || PyList_Append(ids, PyTuple_GET_ITEM(row, 0)) < 0)
                goto fail;
            continue;
        }
        if (!PyTuple_Check(version) || PyTuple_GET_SIZE(version) != 3) {
            PyErr_SetString(PyExc_TypeError, "link(): a version is a 3-tuple or None");
            goto fail;
        }
        entity = PyTuple_GET_ITEM(version, 0);
        last = PyDict_GetItemWithError(latest, entity);
        if (last == NULL && !PyErr_Occurred())
            last = PyDict_GetItemWithError(known, entity);
        if (last == NULL && PyErr_Occurred())
            goto fail;
        if (last != NULL) {
            int same;
            if (!PyTuple_Check(last) || PyTuple_GET_SIZE(last) != 2) {
                PyErr_SetString(PyExc_TypeError, "link(): a last version is a 2-tuple");
                goto fail;
            }
            same = PyObject_RichCompareBool(PyTuple_GET_ITEM(last, 0),
                                            PyTuple_GET_ITEM(version, 1), Py_EQ);
            if (same < 0)
                goto fail;
            if (same) {
                unchanged++;
                if (PyList_Append(ids, Py_None) < 0)
                    goto fail;
                continue;
            }
            if (PyTuple_GET_ITEM(last, 1) != Py_None)
                prev = PyTuple_GET_ITEM(last, 1);
        }
        if (link_one(&ns, row, entity, PyTuple_GET_ITEM(version, 1),
                     PyTuple_GET_ITEM(version, 2), prev, keep, ids, latest) < 0)
            goto fail;
    }
    return Py_BuildValue("(NNn)", keep, ids, unchanged);

fail:
    Py_XDECREF(keep);
    Py_XDECREF(ids);
    return NULL;
}

static PyMethodDef methods[] = {
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL,
     "build(ns, name_prefix, remote_id, remote_id_json, op_json, data, custom, remote_data,"
     " mid, precision, observed_json, src, modified_json) -> (entity_id, content_hash, id,"
     " envelope_json)"},
    {"link", (PyCFunction)(void (*)(void))link_rows, METH_FASTCALL,
     "link(ns, epoch, rows, versions, known, latest) -> (kept rows, ids, unchanged)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent._envelope",
    "EntityBuilder.build's hashing and splicing in C (see agent/records.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__envelope(void)
{
    PyObject *m;

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* Fetched once: the legacy EVP_sha1() would look the implementation up per digest. */
    md_sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    md_sha1 = EVP_sha1();
    md_sha256 = EVP_sha256();
#endif
    ctx = EVP_MD_CTX_new();
    if (md_sha1 == NULL || md_sha256 == NULL || ctx == NULL) {
        PyErr_SetString(PyExc_ImportError, "agent._envelope: OpenSSL has no SHA-1/SHA-256");
        return NULL;
    }
    m = PyModule_Create(&module);
    /* ABI: records.py uses the module only when this matches what it expects, so a stale
     * build left in a source tree is ignored rather than trusted. Bump it with any change
     * to what build() takes or returns. */
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 4) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
