
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdio.h>
#include <string.h>

#include "tmpl.h"


/* the placeholder at p ("{{"): its name into name[], the end after "}}";
 * NULL when unterminated or malformed */
static const char *
meter_tmpl_name(const char *p, char *name, size_t size)
{
    const char  *s, *e, *end;
    size_t       n;

    s = p + 2;
    end = strstr(s, "}}");
    if (end == NULL) {
        return NULL;
    }

    e = end;
    while (s < e && *s == ' ') {
        s++;
    }

    while (e > s && e[-1] == ' ') {
        e--;
    }

    n = (size_t) (e - s);
    if (n == 0 || n >= size || memchr(s, '{', n) != NULL
        || memchr(s, '\n', n) != NULL)
    {
        return NULL;
    }

    memcpy(name, s, n);
    name[n] = '\0';

    return end + 2;
}


int
meter_tmpl_check(const char *tmpl, const char *const *names, char *err,
    size_t errlen)
{
    char         name[64];
    size_t       i;
    unsigned     line;
    const char  *p, *next;

    line = 1;

    for (p = tmpl; *p != '\0'; p++) {
        if (*p == '\n') {
            line++;
            continue;
        }

        if (p[0] != '{' || p[1] != '{') {
            continue;
        }

        next = meter_tmpl_name(p, name, sizeof(name));
        if (next == NULL) {
            snprintf(err, errlen, "line %u: unterminated or empty "
                     "placeholder (expected {{name}})", line);
            return -1;
        }

        for (i = 0; names[i] != NULL; i++) {
            if (strcmp(names[i], name) == 0) {
                break;
            }
        }

        if (names[i] == NULL) {
            snprintf(err, errlen, "line %u: unknown placeholder {{%s}}",
                     line, name);
            return -1;
        }

        p = next - 1;
    }

    return 0;
}


static int
meter_tmpl_html(meter_str_t *out, const char *v)
{
    const char  *rep;
    int          rc;

    for (rc = 0; *v != '\0' && rc == 0; v++) {
        switch (*v) {
        case '&':  rep = "&amp;"; break;
        case '<':  rep = "&lt;"; break;
        case '>':  rep = "&gt;"; break;
        case '"':  rep = "&quot;"; break;
        case '\'': rep = "&#39;"; break;
        default:   rep = NULL; break;
        }

        rc = (rep != NULL) ? meter_str_add(out, rep, strlen(rep))
                           : meter_str_add(out, v, 1);
    }

    return rc;
}


int
meter_tmpl_expand(meter_str_t *out, const char *tmpl,
    const meter_tmpl_var_t *vars, size_t nvars, int html)
{
    char         name[64];
    size_t       i;
    const char  *p, *lit, *next, *v;

    lit = tmpl;

    for (p = tmpl; *p != '\0'; p++) {
        if (p[0] != '{' || p[1] != '{') {
            continue;
        }

        next = meter_tmpl_name(p, name, sizeof(name));
        if (next == NULL) {
            continue;
        }

        if (meter_str_add(out, lit, (size_t) (p - lit)) != 0) {
            return -1;
        }

        v = NULL;
        for (i = 0; i < nvars; i++) {
            if (strcmp(vars[i].name, name) == 0) {
                v = vars[i].value;
                break;
            }
        }

        if (v != NULL) {
            if (html ? meter_tmpl_html(out, v) != 0
                     : meter_str_add(out, v, strlen(v)) != 0)
            {
                return -1;
            }
        }

        lit = next;
        p = next - 1;
    }

    return meter_str_add(out, lit, strlen(lit));
}
