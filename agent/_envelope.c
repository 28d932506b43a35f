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
 * chain() is the outbox writer's step (records.chain_python is its reference): the
 * chained id uuid5(ns, entity_id + ":" + content_hash + ":" + prev), and the envelope
 * with it in place of the provisional id, whose offset the builder knows.
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
str_arg(PyObject *o, const char *name, part *out)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "chain(): %s must be str, not %.80s", name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    out->p = PyUnicode_AsUTF8AndSize(o, &out->n);
    return out->p == NULL ? -1 : 0;
}

/*
 * chain(ns, entity_id, content_hash, prev, body, at, provisional) -> (id, body) | None
 *
 * ns, body: bytes; entity_id, content_hash, prev, provisional: str; at: int. None when
 * the 36 bytes of body at `at` are not `provisional` (the caller then encodes anew).
 */
static PyObject *
chain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    part ns, eid, chash, prev, body, provisional;
    unsigned char sha1_out[EVP_MAX_MD_SIZE];
    char rid[36];
    Py_ssize_t at;
    PyObject *out, *text, *tuple;

    (void)self;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "chain() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (bytes_arg(args[0], "chain", "ns", &ns) < 0 || str_arg(args[1], "entity_id", &eid) < 0 ||
        str_arg(args[2], "content_hash", &chash) < 0 || str_arg(args[3], "prev", &prev) < 0 ||
        bytes_arg(args[4], "chain", "body", &body) < 0 ||
        str_arg(args[6], "provisional", &provisional) < 0)
        return NULL;
    at = PyLong_AsSsize_t(args[5]);
    if (at == -1 && PyErr_Occurred())
        return NULL;
    if (ns.n != 16) {
        PyErr_SetString(PyExc_ValueError, "chain(): ns must be 16 bytes");
        return NULL;
    }
    if (provisional.n != 36 || at < 0 || at > body.n - 36 ||
        memcmp(body.p + at, provisional.p, 36) != 0)
        Py_RETURN_NONE;
    {
        part p[] = {ns, eid, LIT(":"), chash, LIT(":"), prev};
        if (digest(md_sha1, p, 6, sha1_out) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
            return NULL;
        }
        uuid5_text(sha1_out, rid);
    }
    out = PyBytes_FromStringAndSize(body.p, body.n);
    if (out == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(out) + at, rid, 36);
    text = ascii_str(rid, 36);
    if (text == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    tuple = PyTuple_Pack(2, text, out);
    Py_DECREF(text);
    Py_DECREF(out);
    return tuple;
}

static PyMethodDef methods[] = {
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL,
     "build(ns, name_prefix, remote_id, remote_id_json, op_json, data, custom, remote_data,"
     " mid, precision, observed_json, src, modified_json) -> (entity_id, content_hash, id,"
     " envelope_json)"},
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL,
     "chain(ns, entity_id, content_hash, prev, body, at, provisional) -> (id, body) | None"},
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
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
