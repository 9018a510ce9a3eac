
/*
 * Copyright (C) nginx-meter authors
 *
 * Alert templates: text with "{{name}}" placeholders (spaces inside the
 * braces allowed).  The names are checked when the config is loaded, so a
 * typo is a config error, not an email with a hole in it.
 */


#ifndef _METER_TMPL_H_INCLUDED_
#define _METER_TMPL_H_INCLUDED_


#include <stddef.h>

#include "util.h"


typedef struct {
    const char                 *name;
    const char                 *value;          /* NULL: empty */
} meter_tmpl_var_t;


/* 0, or -1 with err naming the unknown or unterminated placeholder;
 * names ends with NULL */
int meter_tmpl_check(const char *tmpl, const char *const *names, char *err,
    size_t errlen);

/*
 * Appends tmpl to out with each placeholder replaced by its value (an
 * unknown one by nothing); html: values escaped for HTML text.  0 or -1
 * (out of memory).
 */
int meter_tmpl_expand(meter_str_t *out, const char *tmpl,
    const meter_tmpl_var_t *vars, size_t nvars, int html);


#endif /* _METER_TMPL_H_INCLUDED_ */
