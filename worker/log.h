
/*
 * Copyright (C) nginx-meter authors
 *
 * Logging for meter-worker and meterctl: stderr only, one line per message,
 * prefixed with the journald priority ("<3>" ... "<7>", sd-daemon.h), no
 * timestamps (journald adds them).  Control characters in a message are
 * escaped ("\x0a"), so no value from outside can start a line.
 */


#ifndef _METER_LOG_H_INCLUDED_
#define _METER_LOG_H_INCLUDED_


#include <stddef.h>
#include <syslog.h>


extern int  meter_log_level;     /* LOG_ERR ... LOG_DEBUG */
extern int  meter_log_prefix;    /* 0: no "<N>" (meterctl on a tty) */


void meter_log(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* s with control characters and DEL as "\xNN", truncated to fit out (size
 * bytes with the NUL); its length */
size_t meter_log_escape(const char *s, char *out, size_t size);

/* "err", "warning", "notice", "info", "debug"; -1 when unknown */
int meter_log_parse_level(const char *s);


#endif /* _METER_LOG_H_INCLUDED_ */
