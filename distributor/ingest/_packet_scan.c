/*
 * The packet contract's fast path: one pass over the raw bytes, no Python objects but the answer.
 *
 * Why: orjson.loads builds a dict, a list and ten message dicts per packet only for the
 * validation to read a few fields and drop them all (about 5 us of a worker's ~24 us per
 * packet). This scanner checks the whole document as strict JSON (RFC 8259, UTF-8 as orjson
 * checks it) and the contract's usual shape in place, and returns what routing needs.
 *
 * It only ever says "this packet is valid and these are its fields" or "ask the Python path"
 * (None): anything unusual (an error of any kind, escapes in keys or ids, duplicate fields,
 * string timestamps, exponents, long numbers, deep nesting) goes to contract.parse_packet's
 * orjson path, which gives the answer and names the error. So the fast path can only be
 * narrower than the reference, never different; tests/ingest/test_packet_scan.py and the
 * contract fuzz target compare the two.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64                              /* deeper metadata: the Python path (orjson allows 1024) */
#define MAX_ID_LENGTH 256                         /* contract.MAX_ID_LENGTH, in code points */
#define MAX_TIMESTAMP_MS 253402300799999LL        /* contract.MAX_TIMESTAMP_MS */
#define MAX_NUMBER_CHARS 40                       /* longer mantissas, 3-digit exponents: the Python path */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Cursor;

typedef struct {
    const unsigned char *start;  /* the string's bytes between the quotes, as written */
    Py_ssize_t size;
    int plain;                   /* no escape sequence */
    Py_ssize_t chars;            /* code points when plain */
} Str;

static PyObject *PRIORITY_HIGH, *PRIORITY_NORMAL, *PRIORITY_LOW;

static inline void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

static inline int hex(unsigned char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    ch |= 0x20;
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

/* A UTF-8 sequence starting at p (first byte >= 0x80), strictly: no overlongs, no surrogates,
 * nothing above U+10FFFF. Returns its length, or 0 when it is not valid. */
static inline int utf8_sequence(const unsigned char *p, const unsigned char *end) {
    unsigned char b0 = p[0];
    Py_ssize_t left = end - p;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        return (left >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    }
    if (b0 >= 0xE0 && b0 <= 0xEF) {
        if (left < 3 || (p[2] & 0xC0) != 0x80) return 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (b0 == 0xE0) lo = 0xA0;
        else if (b0 == 0xED) hi = 0x9F;
        return (p[1] >= lo && p[1] <= hi) ? 3 : 0;
    }
    if (b0 >= 0xF0 && b0 <= 0xF4) {
        if (left < 4 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (b0 == 0xF0) lo = 0x90;
        else if (b0 == 0xF4) hi = 0x8F;
        return (p[1] >= lo && p[1] <= hi) ? 4 : 0;
    }
    return 0;
}

/* c->p at the opening quote. Fills s; returns 0, or -1 (invalid, or an escaped surrogate). */
static int scan_string(Cursor *c, Str *s) {
    const unsigned char *p = c->p + 1, *end = c->end;
    Py_ssize_t chars = 0;
    int plain = 1;
    s->start = p;
    while (p < end) {
        unsigned char ch = *p;
        if (ch == '"') {
            s->size = p - s->start;
            s->plain = plain;
            s->chars = chars;
            c->p = p + 1;
            return 0;
        }
        if (ch < 0x20) return -1;
        if (ch == '\\') {
            plain = 0;
            if (p + 1 >= end) return -1;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                break;
            case 'u': {
                if (end - p < 6) return -1;
                int h0 = hex(p[2]), h1 = hex(p[3]), h2 = hex(p[4]), h3 = hex(p[5]);
                if ((h0 | h1 | h2 | h3) < 0) return -1;
                int code = (h0 << 12) | (h1 << 8) | (h2 << 4) | h3;
                if (code >= 0xD800 && code <= 0xDFFF) return -1;  /* pairs: the Python path */
                p += 6;
                break;
            }
            default:
                return -1;
            }
            chars++;
            continue;
        }
        if (ch < 0x80) {
            p++;
        } else {
            int n = utf8_sequence(p, end);
            if (!n) return -1;
            p += n;
        }
        chars++;
    }
    return -1;
}

/* c->p at '-' or a digit. *integer: a non-negative integer of at most 18 digits (its value in *value). */
static int scan_number(Cursor *c, int *integer, long long *value) {
    const unsigned char *p = c->p, *end = c->end, *start = c->p;
    int negative = 0, fraction = 0, digits = 0;
    long long v = 0;
    if (*p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end) return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            if (++digits <= 18) v = v * 10 + (*p - '0');  /* more digits: not a timestamp, no overflow */
            p++;
        }
    } else {
        return -1;
    }
    if (p < end && *p == '.') {
        fraction = 1;
        p++;
        if (p >= end || *p < '0' || *p > '9') return -1;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p - start > MAX_NUMBER_CHARS) return -1;
    if (p < end && (*p == 'e' || *p == 'E')) {  /* at most two digits: no infinity (an error in orjson) */
        fraction = 1;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        const unsigned char *exponent = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == exponent || p - exponent > 2) return -1;
    }
    *integer = !negative && !fraction && digits <= 18;
    *value = v;
    c->p = p;
    return 0;
}

static int scan_value(Cursor *c, int depth);

/* A member's key and its ':', c->p at the key's quote; c->p at the value afterwards. */
static int member_key(Cursor *c, Str *key) {
    if (c->p >= c->end || *c->p != '"' || scan_string(c, key)) return -1;
    skip_ws(c);
    if (c->p >= c->end || *c->p != ':') return -1;
    c->p++;
    skip_ws(c);
    return 0;
}

/* After a member or an element: 1 when another follows (c->p at it), 0 at ``close`` (read), -1 otherwise. */
static int next_item(Cursor *c, unsigned char close) {
    skip_ws(c);
    if (c->p >= c->end) return -1;
    if (*c->p == ',') {
        c->p++;
        skip_ws(c);
        return 1;
    }
    if (*c->p != close) return -1;
    c->p++;
    return 0;
}

/* c->p just after '{' or '['; any members, any values. */
static int scan_container(Cursor *c, int depth, unsigned char close) {
    if (depth > MAX_DEPTH) return -1;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    int more = 1;
    while (more > 0) {
        Str key;
        if (close == '}' && member_key(c, &key)) return -1;
        if (scan_value(c, depth)) return -1;
        more = next_item(c, close);
    }
    return more;
}

static int expect_literal(Cursor *c, const char *word, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, word, n) != 0) return -1;
    c->p += n;
    return 0;
}

/* c->p at the first byte of a value (after whitespace). */
static int scan_value(Cursor *c, int depth) {
    if (c->p >= c->end) return -1;
    switch (*c->p) {
    case '{':
        c->p++;
        return scan_container(c, depth + 1, '}');
    case '[':
        c->p++;
        return scan_container(c, depth + 1, ']');
    case '"': {
        Str s;
        return scan_string(c, &s);
    }
    case 't':
        return expect_literal(c, "true", 4);
    case 'f':
        return expect_literal(c, "false", 5);
    case 'n':
        return expect_literal(c, "null", 4);
    default: {
        int integer;
        long long value;
        return scan_number(c, &integer, &value);
    }
    }
}

static inline int key_is(const Str *key, const char *name, Py_ssize_t n) {
    return key->plain && key->size == n && memcmp(key->start, name, n) == 0;
}

enum { M_TIMESTAMP = 1, M_LEVEL = 2, M_MESSAGE = 4, M_METADATA = 8 };

/* One message object, c->p just after its '{': the usual message or -1. */
static int scan_message(Cursor *c) {
    int seen = 0;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') return -1;  /* empty: the Python path names the missing field */
    int more = 1;
    while (more > 0) {
        Str key;
        if (member_key(c, &key) || !key.plain || c->p >= c->end) return -1;  /* escaped: the Python path */
        int field = 0;
        if (key_is(&key, "timestamp", 9)) field = M_TIMESTAMP;
        else if (key_is(&key, "level", 5)) field = M_LEVEL;
        else if (key_is(&key, "message", 7)) field = M_MESSAGE;
        else if (key_is(&key, "metadata", 8)) field = M_METADATA;
        if (field & seen) return -1;  /* a repeated field: orjson keeps the last, the Python path decides */
        seen |= field;
        if (field == M_TIMESTAMP) {
            int integer;
            long long value;
            if (*c->p == '"' || scan_number(c, &integer, &value) || !integer || value > MAX_TIMESTAMP_MS)
                return -1;
        } else if (field == M_LEVEL || field == M_MESSAGE) {
            Str s;
            if (*c->p != '"' || scan_string(c, &s)) return -1;
            if (field == M_LEVEL && s.size == 0) return -1;
        } else if (field == M_METADATA) {
            if (*c->p == '{') {
                c->p++;
                if (scan_container(c, 4, '}')) return -1;  /* packet 1, messages 2, message 3 */
            } else if (expect_literal(c, "null", 4)) {
                return -1;
            }
        } else if (scan_value(c, 3)) {
            return -1;
        }
        more = next_item(c, '}');
    }
    if (more < 0) return -1;
    return (seen & (M_TIMESTAMP | M_LEVEL | M_MESSAGE)) == (M_TIMESTAMP | M_LEVEL | M_MESSAGE) ? 0 : -1;
}

/* The messages array, c->p just after '['; returns the count, or -1. */
static Py_ssize_t scan_messages(Cursor *c, Py_ssize_t max_messages) {
    Py_ssize_t count = 0;
    skip_ws(c);
    if (c->p < c->end && *c->p == ']') return -1;  /* empty: an error, named by the Python path */
    int more = 1;
    while (more > 0) {
        if (c->p >= c->end || *c->p != '{') return -1;
        c->p++;
        if (scan_message(c)) return -1;
        if (++count > max_messages) return -1;  /* 413: the Python path */
        more = next_item(c, ']');
    }
    return more < 0 ? -1 : count;
}

/* An emitter_id or packet_id: a plain, non-empty string of at most MAX_ID_LENGTH code points. */
static PyObject *identifier(Cursor *c) {
    Str s;
    if (c->p >= c->end || *c->p != '"' || scan_string(c, &s)) return NULL;
    if (!s.plain || s.size == 0 || s.chars > MAX_ID_LENGTH) return NULL;
    return PyUnicode_DecodeUTF8((const char *)s.start, s.size, "strict");
}

static PyObject *priority(Cursor *c) {
    Str s;
    if (c->p >= c->end || *c->p != '"' || scan_string(c, &s) || !s.plain) return NULL;
    PyObject *value = NULL;
    if (s.size == 4 && memcmp(s.start, "high", 4) == 0) value = PRIORITY_HIGH;
    else if (s.size == 6 && memcmp(s.start, "normal", 6) == 0) value = PRIORITY_NORMAL;
    else if (s.size == 3 && memcmp(s.start, "low", 3) == 0) value = PRIORITY_LOW;
    Py_XINCREF(value);
    return value;
}

/* The packet object. On success sets the four outputs (new references) and returns 0. */
static int scan_packet(Cursor *c, Py_ssize_t max_messages, PyObject **emitter, PyObject **packet,
                       Py_ssize_t *count, PyObject **prio) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '{') return -1;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') return -1;
    *count = -1;
    int more = 1;
    while (more > 0) {
        Str key;
        if (member_key(c, &key) || !key.plain) return -1;  /* escaped keys may spell a field: the Python path */
        if (key_is(&key, "emitter_id", 10)) {
            if (*emitter || !(*emitter = identifier(c))) return -1;
        } else if (key_is(&key, "packet_id", 9)) {
            if (*packet || !(*packet = identifier(c))) return -1;
        } else if (key_is(&key, "priority", 8)) {
            if (*prio || !(*prio = priority(c))) return -1;
        } else if (key_is(&key, "messages", 8)) {
            if (*count >= 0 || c->p >= c->end || *c->p != '[') return -1;
            c->p++;
            if ((*count = scan_messages(c, max_messages)) < 0) return -1;
        } else if (scan_value(c, 1)) {
            return -1;
        }
        more = next_item(c, '}');
    }
    if (more < 0) return -1;
    skip_ws(c);
    if (c->p != c->end) return -1;  /* content after the document */
    return (*emitter && *packet && *count >= 0) ? 0 : -1;
}

PyDoc_STRVAR(scan_doc,
"scan(body, max_messages, result_type) -> result_type(emitter_id, packet_id, messages, priority) | None\n\n"
"The packet's routing fields when it is valid and of the usual shape; None: ask the Python path\n"
"(also for a body that is not exactly bytes, or a max_messages that is not an int).\n"
"result_type: a tuple type that tuple.__new__ may build (a NamedTuple); anything else is a TypeError.");

static PyObject *validated_type;  /* the last result_type that tuple.__new__ accepted */

/* tuple.__new__'s own check, once per type: tuple or a subclass whose instances tuple's constructor
 * may build (a NamedTuple); not e.g. a struct sequence (os.stat_result), whose layout differs. */
static int check_result_type(PyObject *type) {
    if (type == validated_type) return 0;
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "result_type must be a tuple type");
        return -1;
    }
    PyObject *empty = PyObject_CallMethod((PyObject *)&PyTuple_Type, "__new__", "O", type);
    if (empty == NULL) return -1;  /* TypeError: "tuple.__new__(X) is not safe" */
    Py_DECREF(empty);
    Py_XSETREF(validated_type, Py_NewRef(type));
    return 0;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan() takes body, max_messages and result_type");
        return NULL;
    }
    PyObject *type = args[2];
    if (check_result_type(type) < 0) return NULL;
    /* exactly what orjson reads as the reference does and nothing else: other types are its call */
    if (!PyBytes_CheckExact(args[0]) || !PyLong_Check(args[1])) Py_RETURN_NONE;
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (overflow < 0) Py_RETURN_NONE;  /* every count is above it: a 413, named by the reference */
    Py_ssize_t max_messages = (overflow > 0 || limit > PY_SSIZE_T_MAX) ? PY_SSIZE_T_MAX : (Py_ssize_t)limit;
    const unsigned char *start = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Cursor c = {start, start + PyBytes_GET_SIZE(args[0])};
    PyObject *emitter = NULL, *packet = NULL, *prio = NULL, *result = NULL;
    Py_ssize_t count = -1;
    int failed = scan_packet(&c, max_messages, &emitter, &packet, &count, &prio);
    if (PyErr_Occurred()) goto done;  /* an allocation failed */
    if (failed) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *fields = Py_BuildValue("(OOnO)", emitter, packet, count, prio ? prio : PRIORITY_NORMAL);
    if (!fields) goto done;
    PyObject *args1 = PyTuple_Pack(1, fields);
    Py_DECREF(fields);
    if (!args1) goto done;
    result = PyTuple_Type.tp_new((PyTypeObject *)type, args1, NULL);  /* a tuple subclass, made in C */
    Py_DECREF(args1);
done:
    Py_XDECREF(emitter);
    Py_XDECREF(packet);
    Py_XDECREF(prio);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_packet_scan",
    "The packet contract's fast path (see contract.parse_packet).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__packet_scan(void) {
    PRIORITY_HIGH = PyUnicode_InternFromString("high");
    PRIORITY_NORMAL = PyUnicode_InternFromString("normal");
    PRIORITY_LOW = PyUnicode_InternFromString("low");
    if (!PRIORITY_HIGH || !PRIORITY_NORMAL || !PRIORITY_LOW) return NULL;
    return PyModule_Create(&module);
}
