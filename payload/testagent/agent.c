/*
 * agent.c -- TEST PAYLOAD, not a product.
 *
 * A tiny Windows agent, cross-compiled with mingw-w64, that the integration tests install with
 * the MSI and NSIS installers and run under wine. It implements the agent side of the installer
 * contract (payload/README.md) and nothing else: it never talks to a console. The reference
 * agent that a real product ships is payload/agent/agent.py.
 *
 *   agent.exe write-config          --registry-key KEY --config PATH
 *   agent.exe enroll-from-installer --installer PATH --registry-key KEY --config PATH
 *   agent.exe service               --registry-key KEY --config PATH
 *   agent.exe forget                --registry-key KEY --config PATH
 *   agent.exe --version
 *
 * No secret is ever read from the command line or printed: the enrollment token travels from
 * the registry or the installer's signature slot to the config file only.
 */

#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#include <wincrypt.h>
#include <sddl.h>
#include <psapi.h>

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
    EXIT_REGISTRY = 3,       /* a registry value is missing, empty, not REG_SZ or not valid UTF-16 */
    EXIT_WRITE = 4,          /* the config, status or a registry value could not be written */
    EXIT_NO_ENROLLMENT = 5,  /* no slot in the installer, or a slot with length 0 */
    EXIT_MALFORMED = 6,      /* slot or config JSON malformed, or a key missing */
    EXIT_INSTALLER = 7,      /* the installer file cannot be opened or read */
};

/* Generous caps: real tokens are <= 4 KiB and slot payloads ~5 KiB. */
#define MAX_VALUE_BYTES (64u * 1024u)
#define MAX_SLOT_PAYLOAD (64u * 1024u)
#define MAX_CONFIG_BYTES (256u * 1024u)
#define MAX_JSON_DEPTH 32

/* The config file holds the token: only SYSTEM and Administrators may touch it, nothing inherited. */
static const wchar_t CONFIG_SDDL[] = L"D:P(A;;FA;;;SY)(A;;FA;;;BA)";

enum { F_ACCOUNT, F_GROUP, F_URL, F_TOKEN, F_COUNT };
static const struct {
    const char *json;
    const wchar_t *reg;
} FIELDS[F_COUNT] = {
    {"account_id", L"AccountId"},
    {"group_id", L"GroupId"},
    {"console_url", L"ConsoleUrl"},
    {"enrollment_token", L"EnrollmentToken"},
};

/* The four values, UTF-8, NUL-terminated, never empty once loaded. */
typedef struct {
    char *v[F_COUNT];
    size_t len[F_COUNT];
} enrollment;

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
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void buf_puts(buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_putc(buf *b, char c) { buf_put(b, &c, 1); }

static void enrollment_free(enrollment *e)
{
    for (int i = 0; i < F_COUNT; i++) {
        if (e->v[i]) {
            SecureZeroMemory(e->v[i], e->len[i]);
            free(e->v[i]);
        }
        e->v[i] = NULL;
        e->len[i] = 0;
    }
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

static void json_put_member(buf *b, const char *key, const char *v, size_t n, int first)
{
    if (!first) buf_puts(b, ", ");
    json_put_string(b, key, strlen(key));
    buf_puts(b, ": ");
    json_put_string(b, v, n);
}

/* {"account_id": ..., "group_id": ..., "console_url": ..., "enrollment_token": ...}, no newline. */
static void render_config(buf *b, const enrollment *e)
{
    buf_putc(b, '{');
    for (int i = 0; i < F_COUNT; i++) json_put_member(b, FIELDS[i].json, e->v[i], e->len[i], i == 0);
    buf_putc(b, '}');
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
        if (c == '"') return 0;
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

static int jp_literal(jp *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n)) return -1;
    j->p += n;
    return 0;
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
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        jp_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return 0;
        }
        for (;;) {
            if (c == '{') {
                jp_ws(j);
                if (jp_string(j, NULL)) return -1;
                jp_ws(j);
                if (j->p >= j->end || *j->p++ != ':') return -1;
            }
            if (jp_skip(j, depth + 1)) return -1;
            jp_ws(j);
            if (j->p >= j->end) return -1;
            char d = *j->p++;
            if (d == close) return 0;
            if (d != ',') return -1;
        }
    }
    const char *start = j->p;
    while (j->p < j->end && strchr("+-.eE0123456789", *j->p)) j->p++;
    return j->p > start ? 0 : -1;
}

/*
 * Parses {"account_id": "...", ...} into e. Returns 0, or EXIT_MALFORMED with *what naming the
 * problem (a key name or "JSON"). Values must be non-empty strings without NUL; unknown keys are
 * skipped; a duplicate known key is an error (two readers could otherwise disagree).
 */
static int parse_enrollment(const char *s, size_t n, enrollment *e, const char **what)
{
    jp j = {s, s + n};
    buf val = {0};
    *what = "JSON";
    memset(e, 0, sizeof *e);
    jp_ws(&j);
    if (j.p >= j.end || *j.p++ != '{') goto bad;
    jp_ws(&j);
    if (j.p < j.end && *j.p == '}') {
        j.p++;
    } else {
        for (;;) {
            buf key = {0};
            jp_ws(&j);
            int rc = jp_string(&j, &key);
            int field = -1;
            for (int i = 0; rc == 0 && !key.oom && i < F_COUNT; i++)
                if (key.n == strlen(FIELDS[i].json) && !memcmp(key.p, FIELDS[i].json, key.n)) field = i;
            buf_free(&key);
            if (rc) goto bad;
            jp_ws(&j);
            if (j.p >= j.end || *j.p++ != ':') goto bad;
            jp_ws(&j);
            if (field < 0) {
                if (jp_skip(&j, 1)) goto bad;
            } else {
                if (e->v[field]) {
                    *what = FIELDS[field].json;
                    goto bad;
                }
                if (jp_string(&j, &val) || val.oom || val.n == 0 || memchr(val.p, 0, val.n) ||
                    !utf8_valid(val.p, val.n)) {
                    *what = FIELDS[field].json;
                    goto bad;
                }
                e->v[field] = malloc(val.n + 1);
                if (!e->v[field]) goto bad;
                memcpy(e->v[field], val.p, val.n + 1);
                e->len[field] = val.n;
                val.n = 0;
            }
            jp_ws(&j);
            if (j.p >= j.end) goto bad;
            char d = *j.p++;
            if (d == '}') break;
            if (d != ',') goto bad;
        }
    }
    jp_ws(&j);
    if (j.p != j.end) goto bad;
    buf_free(&val);
    for (int i = 0; i < F_COUNT; i++)
        if (!e->v[i]) {
            *what = FIELDS[i].json;
            enrollment_free(e);
            return EXIT_MALFORMED;
        }
    return 0;
bad:
    buf_free(&val);
    enrollment_free(e);
    return EXIT_MALFORMED;
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

/* Reads the four REG_SZ values from HKLM\key in the 64-bit view and converts them to UTF-8. */
static int registry_read(const wchar_t *key, enrollment *e)
{
    HKEY h;
    memset(e, 0, sizeof *e);
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, key, 0, KEY_QUERY_VALUE | KEY_WOW64_64KEY, &h) != ERROR_SUCCESS)
        return fail(EXIT_REGISTRY, L"registry key HKLM\\%ls not found", key);
    int rc = 0;
    for (int i = 0; i < F_COUNT && !rc; i++) {
        DWORD type = 0, size = 0;
        LSTATUS st = RegQueryValueExW(h, FIELDS[i].reg, NULL, &type, NULL, &size);
        if (st != ERROR_SUCCESS || type != REG_SZ || size > MAX_VALUE_BYTES) {
            rc = fail(EXIT_REGISTRY, L"registry value %ls is missing or not a REG_SZ under HKLM\\%ls",
                      FIELDS[i].reg, key);
            break;
        }
        /* The stored data need not be NUL-terminated: leave room for one of our own. */
        wchar_t *w = calloc(size / sizeof(wchar_t) + 2, sizeof *w);
        if (!w) {
            rc = fail(EXIT_REGISTRY, L"out of memory");
            break;
        }
        DWORD got = size;
        st = RegQueryValueExW(h, FIELDS[i].reg, NULL, &type, (BYTE *)w, &got);
        size_t wlen = st == ERROR_SUCCESS ? wcsnlen(w, got / sizeof(wchar_t)) : 0;
        int m = wlen ? WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, w, (int)wlen, NULL, 0, NULL, NULL) : 0;
        if (m > 0 && (e->v[i] = malloc((size_t)m + 1))) {
            WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, w, (int)wlen, e->v[i], m, NULL, NULL);
            e->v[i][m] = 0;
            e->len[i] = (size_t)m;
        } else {
            rc = fail(EXIT_REGISTRY, L"registry value %ls under HKLM\\%ls is empty or not valid UTF-16",
                      FIELDS[i].reg, key);
        }
        SecureZeroMemory(w, (size / sizeof(wchar_t) + 2) * sizeof *w);
        free(w);
    }
    RegCloseKey(h);
    if (rc) enrollment_free(e);
    return rc;
}

static int registry_write(const wchar_t *key, const enrollment *e)
{
    wchar_t *w[F_COUNT] = {0};
    int rc = 0;
    /* Convert everything first: a bad value must not leave a half-written key behind. */
    for (int i = 0; i < F_COUNT && !rc; i++)
        if (!(w[i] = utf8_to_wide(e->v[i], e->len[i])))
            rc = fail(EXIT_MALFORMED, L"enrollment field %hs is not valid UTF-8", FIELDS[i].json);
    HKEY h = NULL;
    if (!rc && RegCreateKeyExW(HKEY_LOCAL_MACHINE, key, 0, NULL, REG_OPTION_NON_VOLATILE,
                               KEY_SET_VALUE | KEY_WOW64_64KEY, NULL, &h, NULL) != ERROR_SUCCESS)
        rc = fail(EXIT_WRITE, L"cannot create registry key HKLM\\%ls", key);
    for (int i = 0; i < F_COUNT && !rc; i++) {
        DWORD bytes = (DWORD)((wcslen(w[i]) + 1) * sizeof(wchar_t));
        if (RegSetValueExW(h, FIELDS[i].reg, 0, REG_SZ, (const BYTE *)w[i], bytes) != ERROR_SUCCESS)
            rc = fail(EXIT_WRITE, L"cannot write registry value %ls under HKLM\\%ls", FIELDS[i].reg, key);
    }
    if (h) RegCloseKey(h);
    for (int i = 0; i < F_COUNT; i++)
        if (w[i]) {
            SecureZeroMemory(w[i], wcslen(w[i]) * sizeof(wchar_t));
            free(w[i]);
        }
    return rc;
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

/* Finds the last slot in the installer and copies its payload out. */
static int read_slot(const wchar_t *installer, buf *payload)
{
    HANDLE f = CreateFileW(installer, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, 0, NULL);
    if (f == INVALID_HANDLE_VALUE) return fail(EXIT_INSTALLER, L"cannot open installer %ls", installer);
    LARGE_INTEGER size;
    if (!GetFileSizeEx(f, &size)) {
        CloseHandle(f);
        return fail(EXIT_INSTALLER, L"cannot read installer %ls", installer);
    }
    if (size.QuadPart < 12) {
        CloseHandle(f);
        return fail(EXIT_NO_ENROLLMENT, L"no enrollment slot in %ls", installer);
    }
    HANDLE map = CreateFileMappingW(f, NULL, PAGE_READONLY, 0, 0, NULL);
    const unsigned char *base = map ? MapViewOfFile(map, FILE_MAP_READ, 0, 0, 0) : NULL;
    if (!base) {
        if (map) CloseHandle(map);
        CloseHandle(f);
        return fail(EXIT_INSTALLER, L"cannot map installer %ls", installer);
    }
    unsigned char magic[8];
    slot_magic(magic);
    size_t n = (size_t)size.QuadPart;
    size_t at = SIZE_MAX;
    for (size_t i = n - 12 + 1; i-- > 0;) /* the last 12 bytes can hold at most magic + length */
        if (base[i] == magic[0] && !memcmp(base + i, magic, 8)) {
            at = i;
            break;
        }
    int rc = 0;
    if (at == SIZE_MAX) {
        rc = fail(EXIT_NO_ENROLLMENT, L"no enrollment slot in %ls", installer);
    } else {
        const unsigned char *q = base + at + 8;
        uint32_t len = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
        if (len == 0) rc = fail(EXIT_NO_ENROLLMENT, L"installer %ls carries no enrollment (empty slot)", installer);
        else if (len > MAX_SLOT_PAYLOAD || len > n - at - 12)
            rc = fail(EXIT_MALFORMED, L"enrollment slot in %ls has an impossible length", installer);
        else {
            buf_put(payload, q + 4, len);
            if (payload->oom) rc = fail(EXIT_MALFORMED, L"out of memory");
        }
    }
    UnmapViewOfFile(base);
    CloseHandle(map);
    CloseHandle(f);
    return rc;
}

/* ---------------------------------------------------------------- commands */

static int write_config_from(const enrollment *e, const wchar_t *config)
{
    buf out = {0};
    render_config(&out, e);
    int rc = out.oom || write_file_atomic(config, out.p, out.n, CONFIG_SDDL)
                 ? fail(EXIT_WRITE, L"cannot write config %ls (error %lu)", config, GetLastError())
                 : 0;
    buf_free(&out);
    return rc;
}

static int cmd_write_config(const wchar_t *key, const wchar_t *config)
{
    enrollment e;
    int rc = registry_read(key, &e);
    if (rc) return rc;
    rc = write_config_from(&e, config);
    enrollment_free(&e);
    return rc;
}

static int cmd_enroll_from_installer(const wchar_t *installer, const wchar_t *key, const wchar_t *config)
{
    buf payload = {0};
    int rc = read_slot(installer, &payload);
    if (!rc) {
        enrollment e;
        const char *what;
        if (parse_enrollment(payload.p, payload.n, &e, &what))
            rc = fail(EXIT_MALFORMED, L"enrollment in %ls is malformed (%hs)", installer, what);
        else {
            rc = registry_write(key, &e);
            enrollment_free(&e);
        }
    }
    buf_free(&payload);
    /* Read back through the registry: the config then holds exactly what the registry holds. */
    return rc ? rc : cmd_write_config(key, config);
}

/* ---------------------------------------------------------------- service */

static struct {
    const wchar_t *key, *config;
    SERVICE_STATUS_HANDLE handle;
    SERVICE_STATUS status;
    HANDLE stop;
    enrollment e;
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

static int sha256_hex(const char *data, size_t n, char out[65])
{
    HCRYPTPROV prov;
    HCRYPTHASH hash;
    BYTE digest[32];
    DWORD dlen = sizeof digest;
    int ok = 0;
    if (!CryptAcquireContextW(&prov, NULL, NULL, PROV_RSA_AES, CRYPT_VERIFYCONTEXT)) return -1;
    if (CryptCreateHash(prov, CALG_SHA_256, 0, 0, &hash)) {
        ok = CryptHashData(hash, (const BYTE *)data, (DWORD)n, 0) &&
             CryptGetHashParam(hash, HP_HASHVAL, digest, &dlen, 0) && dlen == 32;
        CryptDestroyHash(hash);
    }
    CryptReleaseContext(prov, 0);
    for (int i = 0; ok && i < 32; i++) snprintf(out + 2 * i, 3, "%02x", digest[i]);
    return ok ? 0 : -1;
}

/* status.json beside the config: proof that the service read its enrollment. Never the token. */
static int write_status(const char *state, const enrollment *e, int error)
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
    if (e && e->v[F_TOKEN]) {
        for (int i = 0; i < F_TOKEN; i++) json_put_member(&b, FIELDS[i].json, e->v[i], e->len[i], 0);
        char hex[65];
        if (!sha256_hex(e->v[F_TOKEN], e->len[F_TOKEN], hex)) json_put_member(&b, "token_sha256", hex, 64, 0);
    }
    if (error) {
        char num[16];
        snprintf(num, sizeof num, "%d", error);
        buf_puts(&b, ", \"exit_code\": ");
        buf_puts(&b, num);
    }
    buf_putc(&b, '}');
    int rc = b.oom ? -1 : write_file_atomic(path, b.p, b.n, NULL);
    buf_free(&b);
    free(path);
    return rc;
}

/* Loads the config; if the installer never materialised it, does so from the registry first. */
static int svc_load(void)
{
    buf raw = {0};
    int rc = 0;
    if (read_file(svc.config, MAX_CONFIG_BYTES, &raw)) {
        DWORD err = GetLastError();
        buf_free(&raw);
        if (err != ERROR_FILE_NOT_FOUND && err != ERROR_PATH_NOT_FOUND) return EXIT_MALFORMED;
        if ((rc = cmd_write_config(svc.key, svc.config))) return rc;
        if (read_file(svc.config, MAX_CONFIG_BYTES, &raw)) {
            buf_free(&raw);
            return EXIT_MALFORMED;
        }
    }
    const char *what;
    rc = parse_enrollment(raw.p ? raw.p : "", raw.n, &svc.e, &what);
    buf_free(&raw);
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
        enrollment_free(&svc.e);
        svc_report(SERVICE_STOPPED, (DWORD)rc, 0);
        return;
    }
    svc_report(SERVICE_RUNNING, 0, 0);
    WaitForSingleObject(svc.stop, INFINITE);
    /* An uninstall runs `forget` once the service is stopping; a status written after it would
     * be left behind, so a stopped agent whose config is already gone writes none. */
    if (GetFileAttributesW(svc.config) != INVALID_FILE_ATTRIBUTES) write_status("stopped", &svc.e, 0);
    enrollment_free(&svc.e);
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

/* Uninstall: delete the config (it holds the token) and status.json, and their folder if it is
 * then empty. Files already gone are fine: uninstall must not fail on a half-installed agent.
 * The registry values belong to the installer, which removes them itself. */
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

static int cmd_forget(const wchar_t *config)
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
    /* The service told to stop just before this ran may still be writing its last status (it
     * checked for the config a moment before it was deleted): once it has exited, nothing
     * writes there any more. */
    wait_for_other_instances(30000);
    memcpy(path, config, dir * sizeof *path);
    wcscpy(path + dir, L"status.json");
    DeleteFileW(path);
    path[dir - 1] = 0;
    RemoveDirectoryW(path); /* only succeeds when empty */
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- command line */

enum { O_KEY = 1, O_CONFIG = 2, O_INSTALLER = 4 };
static const struct {
    const wchar_t *name;
    unsigned bit;
} OPTIONS[] = {{L"--registry-key", O_KEY}, {L"--config", O_CONFIG}, {L"--installer", O_INSTALLER}};

static const wchar_t USAGE[] =
    L"usage: agent.exe write-config|enroll-from-installer|service|forget --registry-key KEY --config PATH "
    L"[--installer PATH] | --version";

/* Options in any order, each once, as `--name VALUE` or `--name=VALUE`; all of `need` required. */
static int parse_options(int argc, wchar_t **argv, unsigned need, const wchar_t *out[3])
{
    unsigned seen = 0;
    for (int i = 2; i < argc; i++) {
        const wchar_t *a = argv[i], *value = NULL;
        int k = -1;
        for (int o = 0; o < 3 && k < 0; o++) {
            size_t n = wcslen(OPTIONS[o].name);
            if (!wcsncmp(a, OPTIONS[o].name, n) && (a[n] == 0 || a[n] == L'=')) {
                k = o;
                value = a[n] == L'=' ? a + n + 1 : (i + 1 < argc ? argv[++i] : NULL);
            }
        }
        if (k < 0 || !(need & OPTIONS[k].bit))
            return fail(EXIT_USAGE, L"unexpected argument %ls; %ls", a, USAGE);
        if (seen & OPTIONS[k].bit) return fail(EXIT_USAGE, L"%ls given twice", OPTIONS[k].name);
        if (!value || !*value) return fail(EXIT_USAGE, L"%ls needs a value", OPTIONS[k].name);
        seen |= OPTIONS[k].bit;
        out[k] = value;
    }
    for (int o = 0; o < 3; o++)
        if ((need & OPTIONS[o].bit) && !(seen & OPTIONS[o].bit))
            return fail(EXIT_USAGE, L"missing %ls; %ls", OPTIONS[o].name, USAGE);
    if ((need & O_CONFIG) && !is_full_path(out[1]))
        return fail(EXIT_USAGE, L"--config must be a full path such as C:\\ProgramData\\...\\enrollment.json");
    return 0;
}

int wmain(int argc, wchar_t **argv)
{
    const wchar_t *opt[3] = {NULL, NULL, NULL}; /* key, config, installer */
    if (argc == 2 && !wcscmp(argv[1], L"--version")) {
        fputs(AGENT_VERSION "\n", stdout);
        return EXIT_OK;
    }
    if (argc < 2) return fail(EXIT_USAGE, L"%ls", USAGE);
    const wchar_t *cmd = argv[1];
    int rc;
    if (!wcscmp(cmd, L"write-config")) {
        if ((rc = parse_options(argc, argv, O_KEY | O_CONFIG, opt))) return rc;
        return cmd_write_config(opt[0], opt[1]);
    }
    if (!wcscmp(cmd, L"enroll-from-installer")) {
        if ((rc = parse_options(argc, argv, O_KEY | O_CONFIG | O_INSTALLER, opt))) return rc;
        return cmd_enroll_from_installer(opt[2], opt[0], opt[1]);
    }
    if (!wcscmp(cmd, L"service")) {
        if ((rc = parse_options(argc, argv, O_KEY | O_CONFIG, opt))) return rc;
        return cmd_service(opt[0], opt[1]);
    }
    if (!wcscmp(cmd, L"forget")) {
        if ((rc = parse_options(argc, argv, O_KEY | O_CONFIG, opt))) return rc;
        return cmd_forget(opt[1]);
    }
    return fail(EXIT_USAGE, L"unknown command %ls; %ls", cmd, USAGE);
}
