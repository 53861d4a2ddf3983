/*
 * agent.c -- TEST PAYLOAD, not a product.
 *
 * A tiny Windows agent, cross-compiled with mingw-w64, that the integration tests install with
 * the MSI and NSIS installers and run under wine. It implements the agent side of the signed
 * enrollment contract (/work/spec/signed-enrollment.md, issue 8) and nothing else: it never
 * talks to a console. The reference agent that a real product ships is payload/agent/agent.py.
 *
 *   agent.exe enroll-from-installer --installer PATH --registry-key KEY --config PATH
 *   agent.exe enroll-from-registry  --registry-key KEY --config PATH
 *   agent.exe verify-enrollment     --file PATH
 *   agent.exe service               --registry-key KEY --config PATH
 *   agent.exe forget                --registry-key KEY --config PATH
 *   agent.exe --version
 *
 * Every enrollment is a signed enrollment ("SE", a JWS ES256 string). Nothing in an installer's
 * slot, a registry value or a config file is covered by the installer's code signature, so the
 * agent uses no field of an SE before it has verified it against trust.json, which the signed
 * installer put beside agent.exe (pinned keys and console hosts). It fails closed: one line
 * `agent: ...` on stderr, a distinct exit code, nothing written. No secret is ever read from the
 * command line or printed.
 */

#define WIN32_LEAN_AND_MEAN
#define COBJMACROS /* IStorage_OpenStream and friends from C */
#include <windows.h>
#include <bcrypt.h>
#include <objbase.h>
#include <sddl.h>
#include <psapi.h>

#include <fcntl.h>
#include <io.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "1.0.0"
#endif

enum exit_code {
    EXIT_OK = 0,
    EXIT_USAGE = 2,
    EXIT_REGISTRY = 3,       /* PendingEnrollment is missing, empty or not REG_SZ */
    EXIT_WRITE = 4,          /* the config, status or a registry value could not be written */
    EXIT_NO_ENROLLMENT = 5,  /* the slot is empty, or there is no config to start from */
    EXIT_MALFORMED = 6,      /* the SE or the config is not well formed */
    EXIT_INSTALLER = 7,      /* the installer file cannot be opened or read */
    EXIT_UNTRUSTED = 10,     /* not signed by a pinned key: unknown kid, bad signature, key_id mismatch */
    EXIT_EXPIRED = 11,
    EXIT_HOST = 12,          /* console_url not allowed by the pinned hosts */
    EXIT_TRUST = 13,         /* trust.json missing or malformed */
    EXIT_STRUCTURE = 14,     /* the installer's signature is not one slot in one PKCS#7 */
};

#define MAX_SE_CHARS 16384u            /* the contract's limit */
#define MAX_CONFIG_BYTES (64u * 1024u) /* {"enrollment": SE} and room to spare */
#define MAX_TRUST_BYTES (256u * 1024u)
#define MAX_SIGNATURE_BYTES (16u << 20) /* an MSI's \x05DigitalSignature stream */
#define MAX_JSON_DEPTH 32
/* Fixed caps keep trust.json's parser free of reallocation; a rotation needs two keys. */
#define MAX_TRUST_KEYS 16
#define MAX_TRUST_HOSTS 64

/* The config file holds the token: only SYSTEM and Administrators may touch it, nothing inherited. */
static const wchar_t CONFIG_SDDL[] = L"D:P(A;;FA;;;SY)(A;;FA;;;BA)";
static const wchar_t REG_PENDING[] = L"PendingEnrollment"; /* written by the installer */
static const wchar_t REG_ENROLLMENT[] = L"Enrollment";     /* the verified copy, written here */

/* ---------------------------------------------------------------- messages */

/* One line on stderr, UTF-8 (the CRT's wide output would drop non-ASCII characters of paths). */
static int fail(int code, const wchar_t *fmt, ...)
{
    wchar_t w[1024];
    char u[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = _vsnwprintf(w, 1023, fmt, ap);
    va_end(ap);
    w[1023] = 0;
    if (n < 0) n = (int)wcslen(w);
    int m = WideCharToMultiByte(CP_UTF8, 0, w, n, u, (int)sizeof u - 1, NULL, NULL);
    fputs("agent: ", stderr);
    if (m > 0) fwrite(u, 1, (size_t)m, stderr);
    fputc('\n', stderr);
    fflush(stderr);
    return code;
}

/* ---------------------------------------------------------------- buffers */

/* A growable byte buffer that wipes what it frees: it carries the token. */
typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} buf;

static void buf_free(buf *b)
{
    if (b->p) {
        SecureZeroMemory(b->p, b->cap);
        free(b->p);
    }
    b->p = NULL;
    b->n = b->cap = 0;
}

static void buf_put(buf *b, const void *s, size_t n)
{
    if (b->oom) return;
    if (n > SIZE_MAX / 2) {
        b->oom = 1;
        return;
    }
    if (!b->p || n + 1 > b->cap - b->n) { /* +1 keeps room for a terminating NUL */
        size_t c = b->cap ? b->cap : 256;
        while (c - b->n < n + 1) {
            if (c > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            c *= 2;
        }
        char *q = malloc(c);
        if (!q) {
            b->oom = 1;
            return;
        }
        size_t keep = b->n;
        if (keep) memcpy(q, b->p, keep);
        buf_free(b); /* wipes the old copy */
        b->p = q;
        b->n = keep;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void buf_puts(buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_putc(buf *b, char c) { buf_put(b, &c, 1); }

static int buf_equals(const buf *b, const char *s)
{
    size_t n = strlen(s);
    return b->n == n && (n == 0 || !memcmp(b->p, s, n));
}

static int utf8_valid(const char *s, size_t n)
{
    if (n == 0) return 1;
    if (n > INT_MAX) return 0;
    return MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, s, (int)n, NULL, 0) > 0;
}

/* Caller frees. NULL on invalid UTF-8 or out of memory. */
static wchar_t *utf8_to_wide(const char *s, size_t n)
{
    if (n > INT_MAX) return NULL;
    int m = n ? MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, s, (int)n, NULL, 0) : 0;
    if (n && m <= 0) return NULL;
    wchar_t *w = calloc((size_t)m + 1, sizeof *w);
    if (w && m) MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, s, (int)n, w, m);
    return w;
}

/* ---------------------------------------------------------------- JSON out */

/* Escapes exactly as Python's json.dumps(..., ensure_ascii=False) does, so both agents agree. */
static void json_put_string(buf *b, const char *s, size_t n)
{
    buf_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': buf_puts(b, "\\\""); break;
        case '\\': buf_puts(b, "\\\\"); break;
        case '\n': buf_puts(b, "\\n"); break;
        case '\r': buf_puts(b, "\\r"); break;
        case '\t': buf_puts(b, "\\t"); break;
        case '\b': buf_puts(b, "\\b"); break;
        case '\f': buf_puts(b, "\\f"); break;
        default:
            if (c < 0x20) {
                char esc[8];
                snprintf(esc, sizeof esc, "\\u%04x", c);
                buf_puts(b, esc);
            } else {
                buf_putc(b, (char)c);
            }
        }
    }
    buf_putc(b, '"');
}

/* `, "key": "value"` (no comma for the first member). */
static void json_put_member(buf *b, const char *key, const buf *v, int first)
{
    if (!first) buf_puts(b, ", ");
    json_put_string(b, key, strlen(key));
    buf_puts(b, ": ");
    json_put_string(b, v->p ? v->p : "", v->n);
}

static void json_put_int(buf *b, const char *key, long long v)
{
    char num[32];
    snprintf(num, sizeof num, "%lld", v);
    buf_puts(b, ", ");
    json_put_string(b, key, strlen(key));
    buf_puts(b, ": ");
    buf_puts(b, num);
}

/* ---------------------------------------------------------------- JSON in */

typedef struct {
    const char *p, *end;
} jp;

static void jp_ws(jp *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int hex4(jp *j, unsigned *out)
{
    if (j->end - j->p < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static void put_utf8(buf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_put(b, u, n);
}

/* A JSON string at j->p, decoded into out (NULL to skip). Lone surrogates are an error. */
static int jp_string(jp *j, buf *out)
{
    if (j->p >= j->end || *j->p != '"') return -1;
    j->p++;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"') return out && out->oom ? -1 : 0;
        if (c < 0x20) return -1;
        if (c != '\\') {
            if (out) buf_putc(out, (char)c);
            continue;
        }
        if (j->p >= j->end) return -1;
        char e = *j->p++;
        char lit;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (hex4(j, &cp)) return -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return -1;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') return -1;
                j->p += 2;
                if (hex4(j, &lo) || lo < 0xDC00 || lo > 0xDFFF) return -1;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (out) put_utf8(out, cp);
            continue;
        }
        default: return -1;
        }
        if (out) buf_putc(out, lit);
    }
    return -1;
}

/* A string the contract calls "non-empty, no NUL": valid UTF-8, at least one byte. */
static int jp_text(jp *j, buf *out)
{
    if (jp_string(j, out) || out->n == 0 || memchr(out->p, 0, out->n) || !utf8_valid(out->p, out->n)) return -1;
    return 0;
}

/* A JSON number that is an integer (no fraction, no exponent), as Python's json gives an int. */
static int jp_int(jp *j, long long *out)
{
    const char *s = j->p;
    int neg = s < j->end && *s == '-';
    if (neg) s++;
    if (s >= j->end || *s < '0' || *s > '9') return -1;
    if (*s == '0' && s + 1 < j->end && s[1] >= '0' && s[1] <= '9') return -1; /* JSON: no leading zeros */
    unsigned long long v = 0;
    for (; s < j->end && *s >= '0' && *s <= '9'; s++) {
        if (v > (unsigned long long)LLONG_MAX / 10) return -1;
        v = v * 10 + (unsigned)(*s - '0');
        if (v > (unsigned long long)LLONG_MAX) return -1;
    }
    if (s < j->end && (*s == '.' || *s == 'e' || *s == 'E')) return -1; /* a float, not an int */
    *out = neg ? -(long long)v : (long long)v;
    j->p = s;
    return 0;
}

static int jp_literal(jp *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n)) return -1;
    j->p += n;
    return 0;
}

/* Called with j at a member's value, which it must consume. 0, or -1 to reject the document. */
typedef int (*member_fn)(void *ctx, const buf *key, jp *j, int depth);
typedef int (*element_fn)(void *ctx, jp *j, int depth);

static int jp_skip(jp *j, int depth);

static int skip_member(void *ctx, const buf *key, jp *j, int depth)
{
    (void)ctx, (void)key;
    return jp_skip(j, depth);
}

static int key_seen(const buf *keys, const buf *key)
{
    size_t pos = 0, n;
    while (pos < keys->n) {
        memcpy(&n, keys->p + pos, sizeof n);
        pos += sizeof n;
        if (n == key->n && (n == 0 || !memcmp(keys->p + pos, key->p, n))) return 1;
        pos += n;
    }
    return 0;
}

/*
 * An object: each member's value goes to fn. A key that appears twice makes the whole document
 * malformed, at any depth: two parsers (this one, Python's json, the console's) could otherwise
 * each take a different copy.
 */
static int jp_object(jp *j, int depth, member_fn fn, void *ctx)
{
    if (depth > MAX_JSON_DEPTH) return -1;
    jp_ws(j);
    if (j->p >= j->end || *j->p != '{') return -1;
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return 0;
    }
    buf keys = {0}; /* every key so far: its length (size_t), then its bytes */
    int rc = -1;
    for (;;) {
        buf key = {0};
        jp_ws(j);
        int ok = !jp_string(j, &key) && utf8_valid(key.p, key.n) && !key_seen(&keys, &key);
        if (ok) {
            buf_put(&keys, &key.n, sizeof key.n);
            buf_put(&keys, key.p, key.n);
            jp_ws(j);
            ok = !keys.oom && j->p < j->end && *j->p++ == ':';
        }
        if (ok) {
            jp_ws(j);
            ok = fn(ctx, &key, j, depth + 1) == 0;
        }
        buf_free(&key);
        if (!ok) break;
        jp_ws(j);
        if (j->p >= j->end) break;
        char d = *j->p++;
        if (d == '}') {
            rc = 0;
            break;
        }
        if (d != ',') break;
    }
    buf_free(&keys);
    return rc;
}

static int jp_array(jp *j, int depth, element_fn fn, void *ctx)
{
    if (depth > MAX_JSON_DEPTH) return -1;
    jp_ws(j);
    if (j->p >= j->end || *j->p != '[') return -1;
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
        return 0;
    }
    for (;;) {
        jp_ws(j);
        if (fn(ctx, j, depth + 1)) return -1;
        jp_ws(j);
        if (j->p >= j->end) return -1;
        char d = *j->p++;
        if (d == ']') return 0;
        if (d != ',') return -1;
    }
}

static int skip_element(void *ctx, jp *j, int depth)
{
    (void)ctx;
    return jp_skip(j, depth);
}

/* Skips any JSON value, so the pipeline may add keys later without breaking old agents. */
static int jp_skip(jp *j, int depth)
{
    if (depth > MAX_JSON_DEPTH) return -1;
    jp_ws(j);
    if (j->p >= j->end) return -1;
    char c = *j->p;
    if (c == '"') return jp_string(j, NULL);
    if (c == 't') return jp_literal(j, "true");
    if (c == 'f') return jp_literal(j, "false");
    if (c == 'n') return jp_literal(j, "null");
    if (c == '{') return jp_object(j, depth, skip_member, NULL);
    if (c == '[') return jp_array(j, depth, skip_element, NULL);
    const char *start = j->p;
    while (j->p < j->end && strchr("+-.eE0123456789", *j->p)) j->p++;
    return j->p > start ? 0 : -1;
}

/* A whole document that is one object: nothing but whitespace around it. */
static int jp_document(const char *s, size_t n, member_fn fn, void *ctx)
{
    jp j = {s, s + n};
    if (jp_object(&j, 0, fn, ctx)) return -1;
    jp_ws(&j);
    return j.p == j.end ? 0 : -1;
}

/* ---------------------------------------------------------------- base64url */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

/*
 * base64url without padding, strictly: only the alphabet, no '=', and the unused low bits of the
 * last character must be zero, so each byte string has exactly one spelling (an SE whose
 * signature part is spelt two ways would otherwise verify twice).
 */
static int b64url_decode(const char *s, size_t n, buf *out)
{
    if (n % 4 == 1) return -1;
    unsigned acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf_putc(out, (char)((acc >> bits) & 0xFF));
        }
    }
    if (bits && (acc & ((1u << bits) - 1))) return -1;
    if (!out->p) buf_put(out, "", 0); /* an empty part still yields a (NUL-terminated) buffer */
    return out->oom ? -1 : 0;
}

/* ---------------------------------------------------------------- crypto (CNG) */

static int sha256(const void *data, size_t n, unsigned char digest[32])
{
    BCRYPT_ALG_HANDLE alg;
    if (n > ULONG_MAX || BCryptOpenAlgorithmProvider(&alg, BCRYPT_SHA256_ALGORITHM, NULL, 0)) return -1;
    NTSTATUS st = BCryptHash(alg, NULL, 0, (PUCHAR)data, (ULONG)n, digest, 32);
    BCryptCloseAlgorithmProvider(alg, 0);
    return st ? -1 : 0;
}

/* ECDSA P-256 over SHA-256 of `msg`; `sig` is r || s. 1 when it verifies, 0 otherwise. */
static int es256_verify(const unsigned char x[32], const unsigned char y[32], const char *msg, size_t n,
                        const unsigned char sig[64])
{
    unsigned char digest[32];
    if (sha256(msg, n, digest)) return 0;
    struct {
        BCRYPT_ECCKEY_BLOB head;
        unsigned char xy[64];
    } blob;
    blob.head.dwMagic = BCRYPT_ECDSA_PUBLIC_P256_MAGIC;
    blob.head.cbKey = 32;
    memcpy(blob.xy, x, 32);
    memcpy(blob.xy + 32, y, 32);
    BCRYPT_ALG_HANDLE alg;
    BCRYPT_KEY_HANDLE key;
    int ok = 0;
    if (BCryptOpenAlgorithmProvider(&alg, BCRYPT_ECDSA_P256_ALGORITHM, NULL, 0)) return 0;
    if (!BCryptImportKeyPair(alg, NULL, BCRYPT_ECCPUBLIC_BLOB, &key, (PUCHAR)&blob, sizeof blob, 0)) {
        ok = BCryptVerifySignature(key, NULL, digest, sizeof digest, (PUCHAR)sig, 64, 0) == 0;
        BCryptDestroyKey(key);
    }
    BCryptCloseAlgorithmProvider(alg, 0);
    return ok;
}

/* ---------------------------------------------------------------- trust.json */

typedef struct {
    buf kid;
    unsigned char x[32], y[32];
} trust_key;

typedef struct {
    trust_key keys[MAX_TRUST_KEYS];
    buf hosts[MAX_TRUST_HOSTS];
    int nkeys, nhosts;
    long long version;
    int has_version;
} trust;

static void trust_free(trust *t)
{
    for (int i = 0; i < MAX_TRUST_KEYS; i++) buf_free(&t->keys[i].kid);
    for (int i = 0; i < MAX_TRUST_HOSTS; i++) buf_free(&t->hosts[i]);
}

/* One key object while it is parsed: all five members are checked before it is kept. */
typedef struct {
    buf kid, kty, crv, x, y;
} jwk_fields;

static int jwk_member(void *ctx, const buf *key, jp *j, int depth)
{
    jwk_fields *k = ctx;
    if (buf_equals(key, "kid")) return jp_text(j, &k->kid);
    if (buf_equals(key, "kty")) return jp_text(j, &k->kty);
    if (buf_equals(key, "crv")) return jp_text(j, &k->crv);
    if (buf_equals(key, "x")) return jp_text(j, &k->x);
    if (buf_equals(key, "y")) return jp_text(j, &k->y);
    return jp_skip(j, depth);
}

/* base64url of exactly 32 bytes, into out. */
static int coordinate(const buf *b64, unsigned char out[32])
{
    buf raw = {0};
    int ok = b64->p && !b64url_decode(b64->p, b64->n, &raw) && raw.n == 32;
    if (ok) memcpy(out, raw.p, 32);
    buf_free(&raw);
    return ok ? 0 : -1;
}

static int trust_key_element(void *ctx, jp *j, int depth)
{
    trust *t = ctx;
    jwk_fields k = {0};
    int rc = -1;
    if (t->nkeys < MAX_TRUST_KEYS && !jp_object(j, depth, jwk_member, &k) && k.kid.p &&
        buf_equals(&k.kty, "EC") && buf_equals(&k.crv, "P-256")) {
        trust_key *out = &t->keys[t->nkeys];
        if (!coordinate(&k.x, out->x) && !coordinate(&k.y, out->y)) {
            out->kid = k.kid;
            k.kid = (buf){0};
            t->nkeys++;
            rc = 0;
        }
    }
    buf_free(&k.kid), buf_free(&k.kty), buf_free(&k.crv), buf_free(&k.x), buf_free(&k.y);
    return rc;
}

static int trust_host_element(void *ctx, jp *j, int depth)
{
    (void)depth;
    trust *t = ctx;
    if (t->nhosts >= MAX_TRUST_HOSTS || jp_text(j, &t->hosts[t->nhosts])) return -1;
    t->nhosts++;
    return 0;
}

static int trust_member(void *ctx, const buf *key, jp *j, int depth)
{
    trust *t = ctx;
    /* jp_object has already refused a repeated key: each member comes here once. */
    if (buf_equals(key, "version")) {
        t->has_version = 1;
        return jp_int(j, &t->version);
    }
    if (buf_equals(key, "keys")) return jp_array(j, depth, trust_key_element, t);
    if (buf_equals(key, "console_hosts")) return jp_array(j, depth, trust_host_element, t);
    return jp_skip(j, depth);
}

/* Where the signed installer put it: beside this agent.exe. There is deliberately no option
 * to point elsewhere: the pins are only worth what the bytes that hold them are. */
static wchar_t *trust_path(void)
{
    DWORD cap = 32768;
    wchar_t *path = calloc(cap + 16, sizeof *path);
    if (!path) return NULL;
    DWORD n = GetModuleFileNameW(NULL, path, cap);
    wchar_t *slash = n && n < cap ? wcsrchr(path, L'\\') : NULL;
    if (!slash) {
        free(path);
        return NULL;
    }
    wcscpy(slash + 1, L"trust.json");
    return path;
}

static int read_file(const wchar_t *path, size_t cap, buf *out);

static int trust_load(trust *t)
{
    memset(t, 0, sizeof *t);
    wchar_t *path = trust_path();
    if (!path) return fail(EXIT_TRUST, L"cannot locate trust.json beside agent.exe");
    buf raw = {0};
    int rc = 0;
    if (read_file(path, MAX_TRUST_BYTES, &raw))
        rc = fail(EXIT_TRUST, L"cannot read the trust file %ls (error %lu)", path, GetLastError());
    else if (jp_document(raw.p ? raw.p : "", raw.n, trust_member, t) || t->version != 1 || !t->has_version ||
             t->nkeys == 0 || t->nhosts == 0)
        rc = fail(EXIT_TRUST, L"the trust file %ls is malformed (it needs version 1, one or more EC P-256 "
                              L"keys and one or more console hosts)", path);
    buf_free(&raw);
    free(path);
    if (rc) trust_free(t);
    return rc;
}

/* ---------------------------------------------------------------- signed enrollment */

typedef struct {
    buf kid, alg, typ;
} se_header;

typedef struct {
    buf account, group, url, token, key_id;
    long long issued_at, expires_at;
    int has_issued, has_expires;
} se;

static void se_free(se *e)
{
    buf_free(&e->account), buf_free(&e->group), buf_free(&e->url), buf_free(&e->token), buf_free(&e->key_id);
}

/* The header names exactly alg, kid and typ: an unknown member (crit, jku, x5u...) is refused
 * rather than ignored, since honouring it is what it would ask for. */
static int header_member(void *ctx, const buf *key, jp *j, int depth)
{
    (void)depth;
    se_header *h = ctx;
    if (buf_equals(key, "alg")) return jp_text(j, &h->alg);
    if (buf_equals(key, "kid")) return jp_text(j, &h->kid);
    if (buf_equals(key, "typ")) return jp_text(j, &h->typ);
    return -1;
}

static int payload_member(void *ctx, const buf *key, jp *j, int depth)
{
    se *e = ctx;
    if (buf_equals(key, "account_id")) return jp_text(j, &e->account);
    if (buf_equals(key, "group_id")) return jp_text(j, &e->group);
    if (buf_equals(key, "console_url")) return jp_text(j, &e->url);
    if (buf_equals(key, "enrollment_token")) return jp_text(j, &e->token);
    if (buf_equals(key, "key_id")) { /* any string: check 3 compares it with the kid */
        buf_put(&e->key_id, "", 0); /* present even when empty */
        return jp_string(j, &e->key_id) || !utf8_valid(e->key_id.p, e->key_id.n) ? -1 : 0;
    }
    if (buf_equals(key, "issued_at")) {
        e->has_issued = 1;
        return jp_int(j, &e->issued_at);
    }
    if (buf_equals(key, "expires_at")) {
        e->has_expires = 1;
        return jp_int(j, &e->expires_at);
    }
    return jp_skip(j, depth); /* unknown payload keys are ignored (the contract may grow) */
}

static int is_space_or_control(unsigned char c) { return c <= 0x20 || c == 0x7F; }

static int ascii_lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int equal_nocase(const char *a, size_t an, const char *b, size_t bn)
{
    if (an != bn) return 0;
    for (size_t i = 0; i < an; i++)
        if (ascii_lower((unsigned char)a[i]) != ascii_lower((unsigned char)b[i])) return 0;
    return 1;
}

/* "443" -> 443; -1 unless 1..65535 written with digits only. */
static long parse_port(const char *s, size_t n)
{
    if (n == 0 || n > 5) return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= 65535 ? v : -1;
}

/* Does `host` (with its port, -1 when the URL names none) match one pinned pattern? */
static int host_matches(const char *host, size_t hn, long port, const buf *pattern)
{
    const char *p = pattern->p;
    size_t pn = pattern->n;
    const char *colon = memchr(p, ':', pn);
    long want = -1;
    if (colon) {
        if ((want = parse_port(colon + 1, pn - (size_t)(colon + 1 - p))) < 0) return 0;
        pn = (size_t)(colon - p);
    }
    /* With a port in the pattern the URL must name that port; without, none or 443. */
    if (want >= 0 ? port != want : (port != -1 && port != 443)) return 0;
    if (pn > 2 && p[0] == '*' && p[1] == '.') {
        size_t suffix = pn - 1; /* ".example.com": at least one label must come before it */
        return hn > suffix && equal_nocase(host + hn - suffix, suffix, p + 1, suffix);
    }
    return equal_nocase(host, hn, p, pn);
}

/* The contract's console_url rules; 0 when allowed. `why` says which rule failed. */
static int url_allowed(const buf *url, const trust *t, const wchar_t **why)
{
    const char *u = url->p;
    size_t n = url->n;
    *why = L"it must start with https://";
    if (n < 8 || !equal_nocase(u, 8, "https://", 8)) return -1;
    *why = L"it contains whitespace, a backslash or a control character";
    for (size_t i = 0; i < n; i++)
        if (is_space_or_control((unsigned char)u[i]) || u[i] == '\\') return -1;
    const char *auth = u + 8, *end = auth;
    while (end < u + n && *end != '/' && *end != '?' && *end != '#') end++;
    size_t an = (size_t)(end - auth);
    *why = L"its authority has userinfo (@) or a percent escape";
    if (memchr(auth, '@', an) || memchr(auth, '%', an)) return -1;
    /* Non-ASCII in a host could be Unicode whitespace or a look-alike; real hosts are ASCII
     * (IDNs as punycode), and ASCII is what the pinned patterns are compared in. */
    *why = L"its authority has a non-ASCII character";
    for (size_t i = 0; i < an; i++)
        if ((unsigned char)auth[i] >= 0x80) return -1;
    const char *colon = memchr(auth, ':', an);
    size_t hn = colon ? (size_t)(colon - auth) : an;
    long port = -1;
    *why = L"its port is not 1..65535";
    if (colon && (port = parse_port(colon + 1, an - hn - 1)) < 0) return -1;
    *why = L"its host is empty or an IP literal";
    if (hn == 0 || memchr(auth, '[', an)) return -1;
    size_t digits_and_dots = 0;
    while (digits_and_dots < hn && (auth[digits_and_dots] == '.' || (auth[digits_and_dots] >= '0' && auth[digits_and_dots] <= '9')))
        digits_and_dots++;
    if (digits_and_dots == hn) return -1;
    *why = L"its host (and port) matches no pinned console host";
    for (int i = 0; i < t->nhosts; i++)
        if (host_matches(auth, hn, port, &t->hosts[i])) return 0;
    return -1;
}

static long long unix_now(void)
{
    FILETIME ft;
    GetSystemTimeAsFileTime(&ft);
    ULARGE_INTEGER v = {.LowPart = ft.dwLowDateTime, .HighPart = ft.dwHighDateTime};
    return (long long)(v.QuadPart / 10000000ull) - 11644473600ll; /* 1601 -> 1970 */
}

/* Checks 3 to 5 on a well-formed SE: `signing_input` is its first two parts as they appear. */
static int check_claims(const char *signing_input, size_t n, const buf *kid, const unsigned char sig[64],
                        const trust *t, const se *e)
{
    const trust_key *key = NULL;
    for (int i = 0; i < t->nkeys && !key; i++)
        if (t->keys[i].kid.n == kid->n && !memcmp(t->keys[i].kid.p, kid->p, kid->n)) key = &t->keys[i];
    if (!key) return fail(EXIT_UNTRUSTED, L"the enrollment is not signed by a pinned enrollment key (unknown kid)");
    if (!es256_verify(key->x, key->y, signing_input, n, sig))
        return fail(EXIT_UNTRUSTED, L"the enrollment is not signed by a pinned enrollment key (bad signature)");
    if (e->key_id.n != kid->n || memcmp(e->key_id.p, kid->p, kid->n))
        return fail(EXIT_UNTRUSTED, L"the enrollment is not signed by a pinned enrollment key (key_id is not the kid)");
    if (e->has_expires && unix_now() >= e->expires_at) return fail(EXIT_EXPIRED, L"the enrollment has expired");
    const wchar_t *why;
    if (url_allowed(&e->url, t, &why)) return fail(EXIT_HOST, L"console host not allowed: %ls", why);
    return 0;
}

/*
 * The five checks, in the contract's order; the first failure wins and prints its one line.
 * Only when this returns 0 may a caller use any field of *out.
 */
static int verify_se(const char *s, size_t n, const trust *t, se *out)
{
    memset(out, 0, sizeof *out);
    if (n == 0 || n > MAX_SE_CHARS)
        return fail(EXIT_MALFORMED, L"the signed enrollment is empty or longer than %u characters", MAX_SE_CHARS);
    const char *dot[2];
    int dots = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '.') {
            if (dots == 2) return fail(EXIT_MALFORMED, L"the signed enrollment is malformed (more than three parts)");
            dot[dots++] = s + i;
        } else if (b64_value((unsigned char)s[i]) < 0) {
            return fail(EXIT_MALFORMED, L"the signed enrollment is malformed (a character outside base64url)");
        }
    }
    if (dots != 2) return fail(EXIT_MALFORMED, L"the signed enrollment is malformed (not three parts)");

    buf header_raw = {0}, payload_raw = {0}, sig = {0};
    se_header h = {0};
    int rc = 0;
    if (b64url_decode(s, (size_t)(dot[0] - s), &header_raw) ||
        b64url_decode(dot[0] + 1, (size_t)(dot[1] - dot[0] - 1), &payload_raw) ||
        b64url_decode(dot[1] + 1, (size_t)(s + n - dot[1] - 1), &sig))
        rc = fail(EXIT_MALFORMED, L"the signed enrollment is malformed (bad base64url)");
    else if (jp_document(header_raw.p, header_raw.n, header_member, &h) || !buf_equals(&h.alg, "ES256") ||
             !buf_equals(&h.typ, "enrollment+jws") || !h.kid.p)
        rc = fail(EXIT_MALFORMED, L"the signed enrollment is malformed (its header must be exactly "
                                  L"alg ES256, typ enrollment+jws and a kid)");
    else if (jp_document(payload_raw.p, payload_raw.n, payload_member, out) || !out->account.p || !out->group.p ||
             !out->url.p || !out->token.p || !out->key_id.p || !out->has_issued)
        rc = fail(EXIT_MALFORMED, L"the signed enrollment is malformed (its payload needs account_id, group_id, "
                                  L"console_url, enrollment_token, key_id and an integer issued_at)");
    else if (sig.n != 64)
        rc = fail(EXIT_MALFORMED, L"the signed enrollment is malformed (the signature is not 64 bytes)");

    if (!rc) rc = check_claims(s, (size_t)(dot[1] - s), &h.kid, (const unsigned char *)sig.p, t, out);
    buf_free(&header_raw), buf_free(&payload_raw), buf_free(&sig);
    buf_free(&h.kid), buf_free(&h.alg), buf_free(&h.typ);
    if (rc) se_free(out);
    return rc;
}

/* trust.json first (check 1), then the SE; nothing else is done with an SE. */
static int verify_with_trust(const buf *text, se *out)
{
    trust t;
    int rc = trust_load(&t);
    if (rc) return rc;
    rc = verify_se(text->p ? text->p : "", text->n, &t, out);
    trust_free(&t);
    return rc;
}

/* ---------------------------------------------------------------- files */

static int is_full_path(const wchar_t *p)
{
    int drive = ((p[0] | 0x20) >= 'a' && (p[0] | 0x20) <= 'z') && p[1] == L':' &&
                (p[2] == L'\\' || p[2] == L'/');
    int unc = p[0] == L'\\' && p[1] == L'\\';
    return drive || unc;
}

static int is_sep(wchar_t c) { return c == L'\\' || c == L'/'; }

/* Creates every missing folder above the file `path` (a full path). */
static int make_parent_dirs(const wchar_t *path)
{
    size_t n = wcslen(path);
    wchar_t *p = _wcsdup(path);
    if (!p) return -1;
    size_t i = 3; /* after "C:\" */
    if (is_sep(p[0]) && is_sep(p[1])) { /* \\server\share\ : skip server and share */
        int seps = 0;
        for (i = 2; i < n && seps < 2; i++)
            if (is_sep(p[i])) seps++;
    }
    int rc = 0;
    for (; i < n; i++) {
        if (!is_sep(p[i])) continue;
        wchar_t keep = p[i];
        p[i] = 0;
        if (!CreateDirectoryW(p, NULL) && GetLastError() != ERROR_ALREADY_EXISTS) {
            DWORD attrs = GetFileAttributesW(p);
            if (attrs == INVALID_FILE_ATTRIBUTES || !(attrs & FILE_ATTRIBUTE_DIRECTORY)) rc = -1;
        }
        p[i] = keep;
        if (rc) break;
    }
    free(p);
    return rc;
}

/* Writes a temporary file beside `path`, then renames it over `path`: readers never see half. */
static int write_file_atomic(const wchar_t *path, const char *data, size_t n, const wchar_t *sddl)
{
    if (make_parent_dirs(path)) return -1;
    size_t plen = wcslen(path);
    wchar_t *tmp = calloc(plen + 8, sizeof *tmp);
    if (!tmp) return -1;
    memcpy(tmp, path, plen * sizeof *tmp);
    wcscpy(tmp + plen, L".tmp");
    DeleteFileW(tmp); /* a leftover would keep its old security descriptor */

    SECURITY_ATTRIBUTES sa = {sizeof sa, NULL, FALSE};
    PSECURITY_DESCRIPTOR sd = NULL;
    if (sddl && ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, SDDL_REVISION_1, &sd, NULL))
        sa.lpSecurityDescriptor = sd;
    else if (sddl) {
        free(tmp);
        return -1;
    }

    int rc = -1;
    HANDLE h = CreateFileW(tmp, GENERIC_WRITE, 0, &sa, CREATE_NEW, FILE_ATTRIBUTE_NORMAL, NULL);
    if (h != INVALID_HANDLE_VALUE) {
        size_t off = 0;
        while (off < n) {
            DWORD chunk = (DWORD)(n - off > 1u << 20 ? 1u << 20 : n - off), done = 0;
            if (!WriteFile(h, data + off, chunk, &done, NULL) || done == 0) break;
            off += done;
        }
        int ok = off == n && FlushFileBuffers(h);
        CloseHandle(h);
        if (ok && MoveFileExW(tmp, path, MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH)) rc = 0;
        else DeleteFileW(tmp);
    }
    if (sd) LocalFree(sd);
    free(tmp);
    return rc;
}

/* Reads a whole file up to `cap` bytes. 0, or -1 with GetLastError() telling why. */
static int read_file(const wchar_t *path, size_t cap, buf *out)
{
    HANDLE h = CreateFileW(path, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, 0, NULL);
    if (h == INVALID_HANDLE_VALUE) return -1;
    char chunk[4096];
    DWORD got;
    int rc = 0;
    while (ReadFile(h, chunk, sizeof chunk, &got, NULL) && got) {
        if (out->n + got > cap) {
            rc = -1;
            SetLastError(ERROR_FILE_TOO_LARGE);
            break;
        }
        buf_put(out, chunk, got);
    }
    SecureZeroMemory(chunk, sizeof chunk);
    CloseHandle(h);
    if (out->oom) rc = -1;
    return rc;
}

/* ---------------------------------------------------------------- registry */

/* Reads the REG_SZ `name` under HKLM\key (64-bit view) as UTF-8. 0, EXIT_REGISTRY when it is
 * missing, empty or not REG_SZ, EXIT_MALFORMED when larger than `cap` bytes; quietly: the caller
 * says which value it was. */
static int registry_read_sz(const wchar_t *key, const wchar_t *name, size_t cap, buf *out)
{
    HKEY h;
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, key, 0, KEY_QUERY_VALUE | KEY_WOW64_64KEY, &h) != ERROR_SUCCESS)
        return EXIT_REGISTRY;
    DWORD type = 0, size = 0;
    int rc = EXIT_REGISTRY;
    LSTATUS st = RegQueryValueExW(h, name, NULL, &type, NULL, &size);
    if (st == ERROR_SUCCESS && type == REG_SZ && size > cap) rc = EXIT_MALFORMED;
    else if (st == ERROR_SUCCESS && type == REG_SZ) {
        /* The stored data need not be NUL-terminated: leave room for one of our own. */
        size_t wcap = size / sizeof(wchar_t) + 2;
        wchar_t *w = calloc(wcap, sizeof *w);
        DWORD got = size;
        if (w && RegQueryValueExW(h, name, NULL, &type, (BYTE *)w, &got) == ERROR_SUCCESS && type == REG_SZ) {
            size_t wlen = wcsnlen(w, got / sizeof(wchar_t));
            int m = wlen ? WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, w, (int)wlen, NULL, 0, NULL, NULL) : 0;
            char *u = m > 0 ? malloc((size_t)m) : NULL;
            if (u) {
                WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, w, (int)wlen, u, m, NULL, NULL);
                buf_put(out, u, (size_t)m);
                SecureZeroMemory(u, (size_t)m);
                free(u);
                rc = out->oom ? EXIT_REGISTRY : 0;
            }
        }
        if (w) {
            SecureZeroMemory(w, wcap * sizeof *w);
            free(w);
        }
    }
    RegCloseKey(h);
    return rc;
}

static int registry_write_sz(const wchar_t *key, const wchar_t *name, const buf *value)
{
    wchar_t *w = utf8_to_wide(value->p, value->n);
    if (!w) return fail(EXIT_WRITE, L"out of memory");
    HKEY h;
    int rc = 0;
    if (RegCreateKeyExW(HKEY_LOCAL_MACHINE, key, 0, NULL, REG_OPTION_NON_VOLATILE, KEY_SET_VALUE | KEY_WOW64_64KEY,
                        NULL, &h, NULL) != ERROR_SUCCESS)
        rc = fail(EXIT_WRITE, L"cannot create registry key HKLM\\%ls", key);
    else {
        DWORD bytes = (DWORD)((wcslen(w) + 1) * sizeof(wchar_t));
        if (RegSetValueExW(h, name, 0, REG_SZ, (const BYTE *)w, bytes) != ERROR_SUCCESS)
            rc = fail(EXIT_WRITE, L"cannot write registry value %ls under HKLM\\%ls", name, key);
        RegCloseKey(h);
    }
    SecureZeroMemory(w, wcslen(w) * sizeof *w);
    free(w);
    return rc;
}

/* Deletes the value; a key or value that is not there is fine. 0 or EXIT_WRITE (quietly). */
static int registry_delete(const wchar_t *key, const wchar_t *name)
{
    HKEY h;
    LSTATUS st = RegOpenKeyExW(HKEY_LOCAL_MACHINE, key, 0, KEY_SET_VALUE | KEY_WOW64_64KEY, &h);
    if (st == ERROR_FILE_NOT_FOUND) return 0;
    if (st != ERROR_SUCCESS) return EXIT_WRITE;
    st = RegDeleteValueW(h, name);
    RegCloseKey(h);
    return st == ERROR_SUCCESS || st == ERROR_FILE_NOT_FOUND ? 0 : EXIT_WRITE;
}

/* ---------------------------------------------------------------- installer slot */

/*
 * The magic is assembled at run time through a volatile pointer, so the compiler cannot fold it
 * into one 8-byte constant: this binary is embedded in the installers, and a literal copy of the
 * magic inside it could be mistaken for the slot.
 */
static void slot_magic(unsigned char out[8])
{
    static const char head[] = "ENRS";
    static const char tail[] = "LOT1";
    const volatile char *h = head, *t = tail;
    for (int i = 0; i < 4; i++) {
        out[i] = (unsigned char)h[i];
        out[4 + i] = (unsigned char)t[i];
    }
}

/*
 * A DER element: the same walk as builder/binfmt/pkcs7.py, so the agent reads the slot exactly
 * where builder writes it (never by searching for the magic, which anyone can append).
 */
typedef struct {
    unsigned tag;
    size_t start, body, end; /* identifier, contents, just past the contents */
} tlv;

/* The element at d[pos] that must end by `limit`. 0, or -1 when it is not DER. */
static int der_read(const unsigned char *d, size_t pos, size_t limit, tlv *t)
{
    if (pos >= limit || limit - pos < 2) return -1;
    t->start = pos;
    t->tag = d[pos++];
    if ((t->tag & 0x1F) == 0x1F) { /* high tag number: base-128 continuation octets */
        while (pos < limit && (d[pos] & 0x80)) pos++;
        pos++;
    }
    if (pos >= limit) return -1;
    unsigned first = d[pos++];
    size_t len = 0;
    if (first == 0x80) return -1; /* BER indefinite length: not DER */
    if (first < 0x80) {
        len = first;
    } else {
        unsigned count = first & 0x7F;
        if (count > 4 || count > limit - pos) return -1;
        while (count--) len = len << 8 | d[pos++];
    }
    if (len > limit - pos) return -1;
    t->body = pos;
    t->end = pos + len;
    return 0;
}

/* The children of `parent` (up to `max` of them into out; all are checked). -1 if one is bad. */
static int der_children(const unsigned char *d, const tlv *parent, tlv *out, size_t max, size_t *count)
{
    size_t pos = parent->body, n = 0;
    while (pos < parent->end) {
        tlv child;
        if (der_read(d, pos, parent->end, &child)) return -1;
        if (n < max) out[n] = child;
        n++;
        pos = child.end;
    }
    *count = n;
    return 0;
}

/* The last child of `parent`, or -1 when it has none or one is bad. */
static int der_last(const unsigned char *d, const tlv *parent, tlv *last)
{
    size_t pos = parent->body, n = 0;
    while (pos < parent->end) {
        if (der_read(d, pos, parent->end, last)) return -1;
        pos = last->end;
        n++;
    }
    return n ? 0 : -1;
}

static int der_equals(const unsigned char *d, const tlv *t, const unsigned char *want, size_t n)
{
    return t->end - t->start == n && !memcmp(d + t->start, want, n);
}

static const unsigned char OID_SIGNED_DATA[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x02};
/* 1.3.6.1.4.1.32473.1.1, builder's SLOT_OID. */
static const unsigned char OID_SLOT[] = {0x06, 0x0A, 0x2B, 0x06, 0x01, 0x04, 0x01, 0x81, 0xFD, 0x59, 0x01, 0x01};

/*
 * ContentInfo { signedData, [0] { SignedData { ..., SignerInfos } } } -> the first SignerInfo ->
 * its [1] unauthenticated attributes -> the one attribute with OID_SLOT -> SET { OCTET STRING }.
 * `d` is exactly one DER element. 0 with the slot's span, or a reason (the caller exits 14).
 */
static int der_find_slot(const unsigned char *d, size_t n, size_t *slot_at, size_t *slot_len, const wchar_t **why)
{
    tlv ci, parts[2], sd, signer_infos, signer, attrs, inner[1], attr_kids[2], values_kids[1];
    size_t count;
    *why = L"its PKCS#7 is not DER";
    if (der_read(d, 0, n, &ci) || ci.end != n || ci.tag != 0x30) return -1;
    if (der_children(d, &ci, parts, 2, &count)) return -1;
    *why = L"its PKCS#7 is not a SignedData";
    if (count < 2 || !der_equals(d, &parts[0], OID_SIGNED_DATA, sizeof OID_SIGNED_DATA) || parts[1].tag != 0xA0)
        return -1;
    if (der_children(d, &parts[1], inner, 1, &count) || count != 1 || inner[0].tag != 0x30) return -1;
    sd = inner[0];
    tlv fields[4];
    if (der_children(d, &sd, fields, 4, &count) || count < 4 || der_last(d, &sd, &signer_infos) ||
        signer_infos.tag != 0x31)
        return -1;
    *why = L"its PKCS#7 has no SignerInfo";
    if (der_children(d, &signer_infos, &signer, 1, &count) || count < 1 || signer.tag != 0x30) return -1;
    tlv signer_fields[5];
    *why = L"its SignerInfo has no unauthenticated attributes";
    if (der_children(d, &signer, signer_fields, 5, &count) || count < 5 || der_last(d, &signer, &attrs) ||
        attrs.tag != 0xA1)
        return -1;
    int found = 0;
    tlv slot_octets = {0};
    for (size_t pos = attrs.body; pos < attrs.end;) {
        tlv attr;
        *why = L"an unauthenticated attribute is not DER";
        if (der_read(d, pos, attrs.end, &attr) || attr.tag != 0x30) return -1;
        pos = attr.end;
        if (der_children(d, &attr, attr_kids, 2, &count)) return -1;
        if (count == 0 || !der_equals(d, &attr_kids[0], OID_SLOT, sizeof OID_SLOT)) continue;
        *why = L"it has a second enrollment slot";
        if (found++) return -1;
        *why = L"its enrollment slot attribute is malformed";
        if (count != 2 || attr_kids[1].tag != 0x31) return -1;
        if (der_children(d, &attr_kids[1], values_kids, 1, &count) || count != 1 || values_kids[0].tag != 0x04)
            return -1;
        slot_octets = values_kids[0];
    }
    *why = L"it has no enrollment slot";
    if (!found) return -1;
    *slot_at = slot_octets.body;
    *slot_len = slot_octets.end - slot_octets.body;
    return 0;
}

/* The SE in the slot of a PKCS#7 DER blob: 0, EXIT_NO_ENROLLMENT or EXIT_STRUCTURE. */
static int slot_from_pkcs7(const unsigned char *d, size_t n, const wchar_t *installer, buf *out)
{
    size_t at, len;
    const wchar_t *why;
    if (der_find_slot(d, n, &at, &len, &why))
        return fail(EXIT_STRUCTURE, L"the signature of %ls is not as a release writes it: %ls", installer, why);
    unsigned char magic[8];
    slot_magic(magic);
    if (len < 12 || memcmp(d + at, magic, 8))
        return fail(EXIT_STRUCTURE, L"the signature of %ls is not as a release writes it: the slot has no magic",
                    installer);
    const unsigned char *q = d + at + 8;
    uint32_t se_len = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
    if (se_len == 0) return fail(EXIT_NO_ENROLLMENT, L"installer %ls carries no enrollment (empty slot)", installer);
    if (se_len > len - 12)
        return fail(EXIT_STRUCTURE, L"the signature of %ls is not as a release writes it: the slot's length "
                                    L"runs past the slot", installer);
    buf_put(out, q + 4, se_len);
    return out->oom ? fail(EXIT_MALFORMED, L"out of memory") : 0;
}

static uint32_t le32(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

/*
 * PE: data directory 4 -> the certificate table, which must end exactly at the end of the file
 * and hold exactly one WIN_CERTIFICATE (revision 2.0, PKCS_SIGNED_DATA) whose PKCS#7 is followed
 * by at most 7 zero bytes. Anything else there is what Windows' signature check does not cover
 * (CVE-2013-3900): a second slot could hide in it.
 */
static int slot_from_pe(const unsigned char *d, size_t size, const wchar_t *installer, buf *out)
{
    const wchar_t *why = L"it is not a PE file";
    if (size < 64 || d[0] != 'M' || d[1] != 'Z') goto bad;
    size_t pe = le32(d + 0x3C);
    if (pe > size - 24 || memcmp(d + pe, "PE\0\0", 4)) goto bad;
    size_t optional_size = le16(d + pe + 20), opt = pe + 24;
    if (opt + 2 > size) goto bad;
    uint16_t magic = le16(d + opt);
    if (magic != 0x10B && magic != 0x20B) goto bad;
    size_t count_at = opt + (magic == 0x10B ? 92 : 108), entry = opt + (magic == 0x10B ? 96 : 112) + 8 * 4;
    why = L"it has no security data directory";
    if (entry + 8 > opt + optional_size || entry + 8 > size || le32(d + count_at) <= 4) goto bad;
    uint64_t table = le32(d + entry), table_size = le32(d + entry + 4);
    why = L"it is not signed";
    if (table == 0 || table_size == 0) goto bad;
    why = L"its certificate table does not end at the end of the file";
    if (table + table_size != size) goto bad;
    why = L"its certificate table is not one Authenticode WIN_CERTIFICATE";
    if (table_size < 8) goto bad;
    const unsigned char *cert = d + table;
    uint32_t length = le32(cert);
    if (length != table_size || le16(cert + 4) != 0x0200 || le16(cert + 6) != 0x0002) goto bad;
    tlv der;
    why = L"its PKCS#7 is not DER";
    if (der_read(cert, 8, length, &der)) goto bad;
    why = L"there are bytes after its PKCS#7";
    if (length - der.end > 7) goto bad;
    for (size_t i = der.end; i < length; i++)
        if (cert[i]) goto bad;
    return slot_from_pkcs7(cert + 8, der.end - 8, installer, out);
bad:
    return fail(EXIT_STRUCTURE, L"the signature of %ls is not as a release writes it: %ls", installer, why);
}

/* MSI: the compound file's \x05DigitalSignature stream, read through structured storage (ole32),
 * is exactly one PKCS#7 DER element. */
static int slot_from_msi(const wchar_t *installer, buf *out)
{
    IStorage *stg = NULL;
    IStream *stream = NULL;
    buf sig = {0};
    const wchar_t *why = L"it is not a readable compound file";
    HRESULT hr = StgOpenStorage(installer, NULL, STGM_READ | STGM_SHARE_DENY_WRITE, NULL, 0, &stg);
    if (FAILED(hr)) goto bad;
    why = L"it is not signed (no \\x05DigitalSignature stream)";
    hr = IStorage_OpenStream(stg, L"\x05" L"DigitalSignature", NULL, STGM_READ | STGM_SHARE_EXCLUSIVE, 0, &stream);
    if (FAILED(hr)) goto bad;
    STATSTG st;
    why = L"its signature stream is unreadable or too large";
    if (FAILED(IStream_Stat(stream, &st, STATFLAG_NONAME)) || st.cbSize.QuadPart > MAX_SIGNATURE_BYTES) goto bad;
    unsigned char chunk[4096];
    ULONG got;
    while (SUCCEEDED(hr = IStream_Read(stream, chunk, sizeof chunk, &got)) && got) buf_put(&sig, chunk, got);
    if (FAILED(hr) || sig.oom || sig.n != st.cbSize.QuadPart) goto bad;
    tlv der;
    why = L"its signature stream is not one DER element (bytes after the PKCS#7?)";
    if (der_read((const unsigned char *)sig.p, 0, sig.n, &der) || der.end != sig.n) goto bad;
    IStream_Release(stream);
    IStorage_Release(stg);
    int rc = slot_from_pkcs7((const unsigned char *)sig.p, sig.n, installer, out);
    buf_free(&sig);
    return rc;
bad:
    if (stream) IStream_Release(stream);
    if (stg) IStorage_Release(stg);
    buf_free(&sig);
    return fail(EXIT_STRUCTURE, L"the signature of %ls is not as a release writes it: %ls", installer, why);
}

/* The SE stamped into a signed EXE or MSI (told apart by their first bytes). */
static int read_installer_slot(const wchar_t *installer, buf *out)
{
    static const unsigned char CFB[8] = {0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1};
    HANDLE f = CreateFileW(installer, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, 0, NULL);
    if (f == INVALID_HANDLE_VALUE) return fail(EXIT_INSTALLER, L"cannot open installer %ls", installer);
    LARGE_INTEGER size;
    unsigned char head[8] = {0};
    DWORD got = 0;
    if (!GetFileSizeEx(f, &size) || !ReadFile(f, head, sizeof head, &got, NULL)) {
        CloseHandle(f);
        return fail(EXIT_INSTALLER, L"cannot read installer %ls", installer);
    }
    if (got == sizeof head && !memcmp(head, CFB, sizeof CFB)) {
        CloseHandle(f);
        return slot_from_msi(installer, out);
    }
    if (got < 2 || head[0] != 'M' || head[1] != 'Z' || (uint64_t)size.QuadPart > SIZE_MAX) {
        CloseHandle(f);
        return fail(EXIT_STRUCTURE, L"%ls is neither a signed EXE nor a signed MSI", installer);
    }
    HANDLE map = CreateFileMappingW(f, NULL, PAGE_READONLY, 0, 0, NULL);
    const unsigned char *base = map ? MapViewOfFile(map, FILE_MAP_READ, 0, 0, 0) : NULL;
    int rc = base ? slot_from_pe(base, (size_t)size.QuadPart, installer, out)
                  : fail(EXIT_INSTALLER, L"cannot map installer %ls", installer);
    if (base) UnmapViewOfFile(base);
    if (map) CloseHandle(map);
    CloseHandle(f);
    return rc;
}

/* ---------------------------------------------------------------- commands */

/* A verified SE becomes the config file (atomically), then the registry's verified copy. */
static int store_enrollment(const buf *text, const wchar_t *key, const wchar_t *config)
{
    buf out = {0};
    buf_puts(&out, "{\"enrollment\": ");
    json_put_string(&out, text->p, text->n);
    buf_putc(&out, '}');
    int rc = out.oom || write_file_atomic(config, out.p, out.n, CONFIG_SDDL)
                 ? fail(EXIT_WRITE, L"cannot write config %ls (error %lu)", config, GetLastError())
                 : 0;
    buf_free(&out);
    return rc ? rc : registry_write_sz(key, REG_ENROLLMENT, text);
}

static int cmd_enroll_from_installer(const wchar_t *installer, const wchar_t *key, const wchar_t *config)
{
    buf text = {0};
    se e;
    int rc = read_installer_slot(installer, &text);
    if (!rc && !(rc = verify_with_trust(&text, &e))) {
        rc = store_enrollment(&text, key, config);
        se_free(&e);
    }
    buf_free(&text);
    /* A release MSI stages an empty PendingEnrollment (it has no ENROLLMENT property): gone
     * whatever happened, so the key holds nothing but a verified Enrollment. */
    int deleted = registry_delete(key, REG_PENDING);
    if (!rc && deleted) rc = fail(EXIT_WRITE, L"cannot delete registry value %ls under HKLM\\%ls", REG_PENDING, key);
    return rc;
}

static int cmd_enroll_from_registry(const wchar_t *key, const wchar_t *config)
{
    buf text = {0};
    /* Room for one character past the limit (and a NUL), so an SE one too long is "malformed". */
    int rc = registry_read_sz(key, REG_PENDING, (MAX_SE_CHARS + 2) * sizeof(wchar_t), &text);
    /* Deleted whatever happens next: an unverified value must not wait there for a later run. */
    int deleted = registry_delete(key, REG_PENDING);
    if (rc == EXIT_MALFORMED) {
        rc = fail(EXIT_MALFORMED, L"the signed enrollment in %ls is longer than %u characters", REG_PENDING, MAX_SE_CHARS);
    } else if (rc) {
        rc = fail(EXIT_REGISTRY, L"registry value %ls under HKLM\\%ls is missing, empty, too long or not a REG_SZ",
                  REG_PENDING, key);
    } else {
        se e;
        if (!(rc = verify_with_trust(&text, &e))) {
            rc = store_enrollment(&text, key, config);
            se_free(&e);
        }
    }
    buf_free(&text);
    if (!rc && deleted) rc = fail(EXIT_WRITE, L"cannot delete registry value %ls under HKLM\\%ls", REG_PENDING, key);
    return rc;
}

/* For tests and support: checks an SE file and prints its public fields, never the token. */
static int cmd_verify_enrollment(const wchar_t *file, const wchar_t *installer)
{
    buf text = {0};
    if (installer) {
        /* The EXE's own check before it touches an installed agent: its slot, nothing written. */
        int rc = read_installer_slot(installer, &text);
        if (rc) {
            buf_free(&text);
            return rc;
        }
    } else if (read_file(file, MAX_SE_CHARS, &text)) {
        DWORD err = GetLastError();
        buf_free(&text);
        if (err == ERROR_FILE_TOO_LARGE)
            return fail(EXIT_MALFORMED, L"the signed enrollment is longer than %u characters", MAX_SE_CHARS);
        return fail(EXIT_INSTALLER, L"cannot read %ls (error %lu)", file, err);
    }
    se e;
    int rc = verify_with_trust(&text, &e);
    buf_free(&text);
    if (rc) return rc;
    buf line = {0};
    json_put_member(&line, "account_id", &e.account, 1);
    json_put_member(&line, "group_id", &e.group, 0);
    json_put_member(&line, "console_url", &e.url, 0);
    json_put_member(&line, "key_id", &e.key_id, 0);
    json_put_int(&line, "issued_at", e.issued_at);
    if (e.has_expires) json_put_int(&line, "expires_at", e.expires_at);
    se_free(&e);
    if (line.oom) return fail(EXIT_WRITE, L"out of memory");
    _setmode(_fileno(stdout), _O_BINARY); /* one "\n", not "\r\n" */
    fputc('{', stdout);
    fwrite(line.p, 1, line.n, stdout);
    fputs("}\n", stdout);
    fflush(stdout);
    buf_free(&line);
    return EXIT_OK;
}

/* ---------------------------------------------------------------- service */

static struct {
    const wchar_t *key, *config;
    SERVICE_STATUS_HANDLE handle;
    SERVICE_STATUS status;
    HANDLE stop;
    se e;
} svc;

static void svc_report(DWORD state, DWORD specific, DWORD wait_hint)
{
    svc.status.dwServiceType = SERVICE_WIN32_OWN_PROCESS;
    svc.status.dwCurrentState = state;
    svc.status.dwControlsAccepted =
        state == SERVICE_RUNNING ? SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN : 0;
    svc.status.dwWin32ExitCode = specific ? ERROR_SERVICE_SPECIFIC_ERROR : NO_ERROR;
    svc.status.dwServiceSpecificExitCode = specific;
    svc.status.dwWaitHint = wait_hint;
    svc.status.dwCheckPoint = (state == SERVICE_RUNNING || state == SERVICE_STOPPED) ? 0 : svc.status.dwCheckPoint + 1;
    SetServiceStatus(svc.handle, &svc.status);
}

/* status.json beside the config: proof that the service verified its enrollment. Never the token. */
static int write_status(const char *state, const se *e, int error)
{
    const wchar_t *slash = NULL;
    for (const wchar_t *c = svc.config; *c; c++)
        if (is_sep(*c)) slash = c;
    size_t dir = (size_t)(slash - svc.config) + 1;
    wchar_t *path = calloc(dir + 16, sizeof *path);
    if (!path) return -1;
    memcpy(path, svc.config, dir * sizeof *path);
    wcscpy(path + dir, L"status.json");

    buf b = {0};
    buf_puts(&b, "{\"state\": ");
    json_put_string(&b, state, strlen(state));
    if (e && e->token.p) {
        json_put_member(&b, "account_id", &e->account, 0);
        json_put_member(&b, "group_id", &e->group, 0);
        json_put_member(&b, "console_url", &e->url, 0);
        json_put_member(&b, "key_id", &e->key_id, 0);
        unsigned char digest[32];
        buf hex = {0};
        if (!sha256(e->token.p, e->token.n, digest)) {
            for (int i = 0; i < 32; i++) {
                char h[3];
                snprintf(h, sizeof h, "%02x", digest[i]);
                buf_puts(&hex, h);
            }
            json_put_member(&b, "token_sha256", &hex, 0);
        }
        buf_free(&hex);
    }
    if (error) json_put_int(&b, "exit_code", error);
    buf_putc(&b, '}');
    int rc = b.oom ? -1 : write_file_atomic(path, b.p, b.n, NULL);
    buf_free(&b);
    free(path);
    return rc;
}

static int config_member(void *ctx, const buf *key, jp *j, int depth)
{
    if (buf_equals(key, "enrollment")) return jp_text(j, ctx);
    return jp_skip(j, depth);
}

/* Loads the config and verifies its SE again (all five checks): the file sits on disk between
 * starts, and trust.json may have changed with an upgrade (a rotated key, fewer hosts). */
static int svc_load(void)
{
    buf raw = {0}, text = {0};
    int rc;
    if (read_file(svc.config, MAX_CONFIG_BYTES, &raw)) {
        DWORD err = GetLastError();
        rc = err == ERROR_FILE_NOT_FOUND || err == ERROR_PATH_NOT_FOUND
                 ? fail(EXIT_NO_ENROLLMENT, L"no config %ls: the agent is not enrolled", svc.config)
                 : fail(EXIT_MALFORMED, L"cannot read config %ls (error %lu)", svc.config, err);
    } else if (jp_document(raw.p ? raw.p : "", raw.n, config_member, &text) || !text.p) {
        rc = fail(EXIT_MALFORMED, L"config %ls is malformed", svc.config);
    } else {
        rc = verify_with_trust(&text, &svc.e);
    }
    buf_free(&raw);
    buf_free(&text);
    return rc;
}

static DWORD WINAPI svc_control(DWORD control, DWORD type, LPVOID data, LPVOID context)
{
    (void)type, (void)data, (void)context;
    switch (control) {
    case SERVICE_CONTROL_STOP:
    case SERVICE_CONTROL_SHUTDOWN:
        svc_report(SERVICE_STOP_PENDING, 0, 5000);
        SetEvent(svc.stop);
        return NO_ERROR;
    case SERVICE_CONTROL_INTERROGATE:
        return NO_ERROR;
    default:
        return ERROR_CALL_NOT_IMPLEMENTED;
    }
}

/* TEST hook (this is the test agent): a DWORD TestStartDelayMs under the enrollment key keeps
 * the service START_PENDING that long (at most 20 s), so a test can make an installer meet a
 * service that is still starting, as right after boot. Nothing writes it but such a test. */
static void svc_test_start_delay(void)
{
    HKEY h;
    DWORD delay = 0, size = sizeof delay, type = 0;
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, svc.key, 0, KEY_QUERY_VALUE | KEY_WOW64_64KEY, &h) != ERROR_SUCCESS) return;
    if (RegQueryValueExW(h, L"TestStartDelayMs", NULL, &type, (BYTE *)&delay, &size) != ERROR_SUCCESS || type != REG_DWORD)
        delay = 0;
    RegCloseKey(h);
    for (DWORD waited = 0; waited < delay && waited < 20000; waited += 250) {
        Sleep(250);
        svc_report(SERVICE_START_PENDING, 0, 5000);
    }
}

static void WINAPI svc_main(DWORD argc, LPWSTR *argv)
{
    (void)argc, (void)argv; /* options come from the image path's command line, not StartService */
    /* The name is ignored for SERVICE_WIN32_OWN_PROCESS. */
    svc.handle = RegisterServiceCtrlHandlerExW(L"", svc_control, NULL);
    if (!svc.handle) return;
    svc_report(SERVICE_START_PENDING, 0, 5000);
    svc_test_start_delay();
    svc.stop = CreateEventW(NULL, TRUE, FALSE, NULL);
    int rc = svc.stop ? svc_load() : EXIT_WRITE;
    if (!rc && write_status("running", &svc.e, 0)) rc = EXIT_WRITE;
    if (rc) {
        write_status("error", NULL, rc);
        se_free(&svc.e);
        svc_report(SERVICE_STOPPED, (DWORD)rc, 0);
        return;
    }
    svc_report(SERVICE_RUNNING, 0, 0);
    WaitForSingleObject(svc.stop, INFINITE);
    /* An uninstall runs `forget` once the service is stopping; a status written after it would
     * be left behind, so a stopped agent whose config is already gone writes none. */
    if (GetFileAttributesW(svc.config) != INVALID_FILE_ATTRIBUTES) write_status("stopped", &svc.e, 0);
    se_free(&svc.e);
    svc_report(SERVICE_STOPPED, 0, 0);
}

static int cmd_service(const wchar_t *key, const wchar_t *config)
{
    svc.key = key;
    svc.config = config;
    SERVICE_TABLE_ENTRYW table[] = {{(LPWSTR)L"", svc_main}, {NULL, NULL}};
    if (StartServiceCtrlDispatcherW(table)) return EXIT_OK;
    if (GetLastError() == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT)
        return fail(EXIT_USAGE, L"the service command is run by the service control manager, not by hand");
    return fail(EXIT_WRITE, L"service dispatcher failed (error %lu)", GetLastError());
}

/* Waits, at most `ms`, until no other process runs this same agent.exe. An uninstaller runs
 * `forget` after telling the service to stop; Windows Installer waits for SERVICE_STOPPED
 * (wine's does not wait at all), but the process may still be exiting, and a running image
 * cannot be deleted: RemoveFiles would leave agent.exe behind until a reboot. */
static void wait_for_other_instances(DWORD ms)
{
    wchar_t self[MAX_PATH];
    DWORD len = GetModuleFileNameW(NULL, self, MAX_PATH);
    if (!len || len >= MAX_PATH) return;
    DWORD start = GetTickCount(), me = GetCurrentProcessId();
    for (;;) {
        DWORD pids[4096], bytes = 0;
        if (!K32EnumProcesses(pids, sizeof pids, &bytes)) return;
        int seen = 0; /* another instance was found: it has exited or time is up */
        for (DWORD i = 0; i < bytes / sizeof *pids; i++) {
            if (pids[i] == me || !pids[i]) continue;
            HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, pids[i]);
            if (!h) continue;
            wchar_t image[MAX_PATH];
            DWORD n = MAX_PATH;
            if (QueryFullProcessImageNameW(h, 0, image, &n) && _wcsicmp(image, self) == 0) {
                DWORD spent = GetTickCount() - start;
                if (spent < ms) WaitForSingleObject(h, ms - spent);
                seen = 1;
            }
            CloseHandle(h);
        }
        /* Look again after an exit (one more may have started); give up when time is up. */
        if (!seen || GetTickCount() - start >= ms) return;
    }
}

/* Uninstall: delete the config (it holds the token), the registry's Enrollment and any
 * PendingEnrollment, then status.json and the config's folder if it is then empty. Anything
 * already gone is fine: uninstall must not fail on a half-installed agent. */
static int cmd_forget(const wchar_t *key, const wchar_t *config)
{
    const wchar_t *slash = NULL;
    for (const wchar_t *c = config; *c; c++)
        if (is_sep(*c)) slash = c;
    size_t dir = (size_t)(slash - config) + 1;
    wchar_t *path = calloc(wcslen(config) + 16, sizeof *path);
    if (!path) return fail(EXIT_WRITE, L"out of memory");
    int rc = 0;
    if (!DeleteFileW(config) && GetLastError() != ERROR_FILE_NOT_FOUND && GetLastError() != ERROR_PATH_NOT_FOUND)
        rc = fail(EXIT_WRITE, L"cannot delete %ls (error %lu)", config, GetLastError());
    int kept = registry_delete(key, REG_ENROLLMENT) | registry_delete(key, REG_PENDING); /* both tried */
    if (kept && !rc) rc = fail(EXIT_WRITE, L"cannot delete the enrollment values under HKLM\\%ls", key);
    /* The service told to stop just before this ran may still be writing its last status (it
     * checked for the config a moment before it was deleted): once it has exited, nothing
     * writes there any more. */
    wait_for_other_instances(30000);
    /* A write cut short (a service killed at shutdown) leaves its ".tmp" beside the file: it
     * goes too, or the folder would stay. */
    wchar_t *tmp = calloc(wcslen(config) + 8, sizeof *tmp);
    if (tmp) {
        wcscpy(tmp, config);
        wcscat(tmp, L".tmp");
        DeleteFileW(tmp);
        free(tmp);
    }
    memcpy(path, config, dir * sizeof *path);
    wcscpy(path + dir, L"status.json.tmp");
    DeleteFileW(path);
    wcscpy(path + dir, L"status.json");
    DeleteFileW(path);
    path[dir - 1] = 0;
    RemoveDirectoryW(path); /* only succeeds when empty */
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- command line */

enum { O_KEY, O_CONFIG, O_INSTALLER, O_FILE, O_COUNT };
static const wchar_t *const OPTIONS[O_COUNT] = {L"--registry-key", L"--config", L"--installer", L"--file"};
#define BIT(o) (1u << (o))

static const wchar_t USAGE[] =
    L"usage: agent.exe enroll-from-installer|enroll-from-registry|service|forget --registry-key KEY --config PATH "
    L"[--installer PATH] | verify-enrollment --file PATH|--installer PATH | --version";

/* Options in any order, each once, as `--name VALUE` or `--name=VALUE`; all of `need` required. */
static int parse_options(int argc, wchar_t **argv, unsigned need, const wchar_t *out[O_COUNT])
{
    unsigned seen = 0;
    for (int i = 2; i < argc; i++) {
        const wchar_t *a = argv[i], *value = NULL;
        int k = -1;
        for (int o = 0; o < O_COUNT && k < 0; o++) {
            size_t n = wcslen(OPTIONS[o]);
            if (!wcsncmp(a, OPTIONS[o], n) && (a[n] == 0 || a[n] == L'=')) {
                k = o;
                value = a[n] == L'=' ? a + n + 1 : (i + 1 < argc ? argv[++i] : NULL);
            }
        }
        if (k < 0 || !(need & BIT(k))) return fail(EXIT_USAGE, L"unexpected argument %ls; %ls", a, USAGE);
        if (seen & BIT(k)) return fail(EXIT_USAGE, L"%ls given twice", OPTIONS[k]);
        if (!value || !*value) return fail(EXIT_USAGE, L"%ls needs a value", OPTIONS[k]);
        seen |= BIT(k);
        out[k] = value;
    }
    for (int o = 0; o < O_COUNT; o++)
        if ((need & BIT(o)) && !(seen & BIT(o))) return fail(EXIT_USAGE, L"missing %ls; %ls", OPTIONS[o], USAGE);
    if ((need & BIT(O_CONFIG)) && !is_full_path(out[O_CONFIG]))
        return fail(EXIT_USAGE, L"--config must be a full path such as C:\\ProgramData\\...\\enrollment.json");
    return 0;
}

int wmain(int argc, wchar_t **argv)
{
    const wchar_t *opt[O_COUNT] = {NULL};
    if (argc == 2 && !wcscmp(argv[1], L"--version")) {
        fputs(AGENT_VERSION "\n", stdout);
        return EXIT_OK;
    }
    if (argc < 2) return fail(EXIT_USAGE, L"%ls", USAGE);
    const wchar_t *cmd = argv[1];
    const unsigned key_config = BIT(O_KEY) | BIT(O_CONFIG);
    int rc;
    if (!wcscmp(cmd, L"enroll-from-installer")) {
        if ((rc = parse_options(argc, argv, key_config | BIT(O_INSTALLER), opt))) return rc;
        return cmd_enroll_from_installer(opt[O_INSTALLER], opt[O_KEY], opt[O_CONFIG]);
    }
    if (!wcscmp(cmd, L"enroll-from-registry")) {
        if ((rc = parse_options(argc, argv, key_config, opt))) return rc;
        return cmd_enroll_from_registry(opt[O_KEY], opt[O_CONFIG]);
    }
    if (!wcscmp(cmd, L"verify-enrollment")) {
        int from_installer = 0;
        for (int i = 2; i < argc; i++)
            if (!wcsncmp(argv[i], L"--installer", 11)) from_installer = 1;
        if ((rc = parse_options(argc, argv, BIT(from_installer ? O_INSTALLER : O_FILE), opt))) return rc;
        return cmd_verify_enrollment(opt[O_FILE], from_installer ? opt[O_INSTALLER] : NULL);
    }
    if (!wcscmp(cmd, L"service")) {
        if ((rc = parse_options(argc, argv, key_config, opt))) return rc;
        return cmd_service(opt[O_KEY], opt[O_CONFIG]);
    }
    if (!wcscmp(cmd, L"forget")) {
        if ((rc = parse_options(argc, argv, key_config, opt))) return rc;
        return cmd_forget(opt[O_KEY], opt[O_CONFIG]);
    }
    return fail(EXIT_USAGE, L"unknown command %ls; %ls", cmd, USAGE);
}
