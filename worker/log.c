
/*
 * Copyright (C) nginx-meter authors
 *
 * Every message is escaped here, at the one place lines leave the process:
 * values from outside (ids from webhook bodies, provider error messages)
 * are formatted into messages everywhere, and a newline in one would start
 * a forged journald line ("\n<0>...").  Control characters and DEL become
 * "\xNN"; bytes >= 0x80 (UTF-8) pass.
 */


#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "log.h"


int  meter_log_level = LOG_INFO;
int  meter_log_prefix = 1;


size_t
meter_log_escape(const char *s, char *out, size_t size)
{
    size_t          n;
    unsigned char   c;

    static const char  hex[] = "0123456789abcdef";

    if (size == 0) {
        return 0;
    }

    for (n = 0; *s != '\0'; s++) {
        c = (unsigned char) *s;

        if (c >= 0x20 && c != 0x7f) {
            if (n + 1 >= size) {
                break;
            }

            out[n++] = (char) c;
            continue;
        }

        if (n + 4 >= size) {
            break;
        }

        out[n++] = '\\';
        out[n++] = 'x';
        out[n++] = hex[c >> 4];
        out[n++] = hex[c & 0xf];
    }

    out[n] = '\0';

    return n;
}


void
meter_log(int level, const char *fmt, ...)
{
    char     line[2048], safe[4096];
    va_list  ap;
    int      n;

    if (level > meter_log_level) {
        return;
    }

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);

    if (n < 0) {
        return;
    }

    (void) meter_log_escape(line, safe, sizeof(safe));

    /* one write per message so lines from several processes never mix */
    if (meter_log_prefix) {
        fprintf(stderr, "<%d>%s\n", level, safe);

    } else {
        fprintf(stderr, "%s\n", safe);
    }
}


int
meter_log_parse_level(const char *s)
{
    static const struct {
        const char  *name;
        int          level;
    } levels[] = {
        { "err", LOG_ERR },
        { "error", LOG_ERR },
        { "warning", LOG_WARNING },
        { "notice", LOG_NOTICE },
        { "info", LOG_INFO },
        { "debug", LOG_DEBUG },
    };

    size_t  i;

    for (i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
        if (strcmp(s, levels[i].name) == 0) {
            return levels[i].level;
        }
    }

    return -1;
}
