
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "log.h"


int  meter_log_level = LOG_INFO;
int  meter_log_prefix = 1;


void
meter_log(int level, const char *fmt, ...)
{
    char     line[2048];
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

    /* one write per message so lines from several processes never mix */
    if (meter_log_prefix) {
        fprintf(stderr, "<%d>%s\n", level, line);

    } else {
        fprintf(stderr, "%s\n", line);
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
