
/*
 * Copyright (C) nginx-meter authors
 *
 * The directive handlers: meter_zone, meter, meter_redis, meter_status,
 * meter_governance and the time slots' wrapper.  The command table and the
 * configuration structs are in ngx_http_meter_module.c.
 */


#include "ngx_http_meter_module.h"


static ngx_str_t ngx_http_meter_printable(ngx_pool_t *pool, ngx_str_t *name);
static void ngx_http_meter_key_header(ngx_str_t *key, ngx_str_t *name);
static ngx_int_t ngx_http_meter_key_index(ngx_conf_t *cf, ngx_str_t *key);
static ngx_int_t ngx_http_meter_add_vars(ngx_conf_t *cf, ngx_http_meter_t *m,
    ngx_str_t *s);
static char *ngx_http_meter_read_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_str_t *file, ngx_str_t *secret);
static char *ngx_http_meter_redis_sentinels(ngx_conf_t *cf,
    ngx_command_t *cmd, ngx_http_meter_main_conf_t *mcf, ngx_str_t *arg);


/* "meter off": no meter, and no fall back to another location's */
static ngx_array_t  ngx_http_meter_off;


char *
ngx_http_meter_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_main_conf_t  *mcf = conf;

    u_char                            *p;
    size_t                             size;
    ngx_str_t                         *value, name, s;
    ngx_uint_t                         i;
    ngx_shm_zone_t                    *shm_zone, **zp;
    ngx_http_meter_zone_ctx_t         *ctx;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    ctx = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_zone_ctx_t));
    if (ctx == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = &ctx->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    size = 0;
    name.len = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            name.data = value[i].data + 5;

            p = (u_char *) ngx_strchr(name.data, ':');

            if (p == NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\" in \"%V\" "
                                   "directive, expected zone=NAME:SIZE",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            name.len = p - name.data;

            /* the name goes into JSON, Prometheus labels and Redis keys */
            if (!meter_valid_name((const char *) name.data, name.len)) {
                s = ngx_http_meter_printable(cf->pool, &name);

                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone name \"%V\" in \"%V\" "
                                   "directive: use 1 to %d of "
                                   "A-Z a-z 0-9 _ . -",
                                   &s, &cmd->name, METER_NAME_MAX);
                return NGX_CONF_ERROR;
            }

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);

            if (size == (size_t) NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\" in \"%V\" "
                                   "directive", &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            if (size < (size_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small in \"%V\" "
                                   "directive, the minimum is %uz bytes",
                                   &value[i], &cmd->name,
                                   (size_t) (8 * ngx_pagesize));
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\" in \"%V\" directive",
                           &value[i], &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_meter_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ctx = shm_zone->data;

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%V \"%V\" is already bound to key \"%V\"",
                           &cmd->name, &name, &ctx->key.value);
        return NGX_CONF_ERROR;
    }

    shm_zone->init = ngx_http_meter_init_zone;
    shm_zone->data = ctx;
    ctx->shm_zone = shm_zone;

    ngx_http_meter_key_header(&value[1], &ctx->key_header);

    if (ctx->key_header.len) {
        /* the forms the request path compares header names with */
        p = ngx_pnalloc(cf->pool, 2 * ctx->key_header.len);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        ctx->key_var.data = p;
        ctx->key_var.len = ctx->key_header.len;
        ctx->key_lc.data = p + ctx->key_header.len;
        ctx->key_lc.len = ctx->key_header.len;

        for (i = 0; i < ctx->key_header.len; i++) {
            p[i] = ngx_tolower(ctx->key_header.data[i]);
            ctx->key_lc.data[i] = (p[i] == '_') ? '-' : p[i];
        }
    }

    ctx->key_index = ngx_http_meter_key_index(cf, &value[1]);

    zp = ngx_array_push(&mcf->zones);
    if (zp == NULL) {
        return NGX_CONF_ERROR;
    }

    *zp = shm_zone;

    return NGX_CONF_OK;
}


/* a name to show in an error: bytes outside printable ASCII as \xHH */

static ngx_str_t
ngx_http_meter_printable(ngx_pool_t *pool, ngx_str_t *name)
{
    u_char     *p;
    ngx_str_t   out;
    ngx_uint_t  i;

    out.len = 0;
    out.data = ngx_pnalloc(pool, name->len * 4 + 1);

    if (out.data == NULL) {
        return out;
    }

    p = out.data;

    for (i = 0; i < name->len; i++) {
        if (name->data[i] < 0x20 || name->data[i] > 0x7e
            || name->data[i] == '"' || name->data[i] == '\\')
        {
            p = ngx_sprintf(p, "\\x%02xd", name->data[i]);
            continue;
        }

        *p++ = name->data[i];
    }

    out.len = p - out.data;

    return out;
}


/*
 * A key that is one request header, $http_NAME: governance refuses a call
 * that sends it twice (nginx 1.22 reads the first, a backend may read the
 * last; nginx 1.23 joins them).
 */

static void
ngx_http_meter_key_header(ngx_str_t *key, ngx_str_t *name)
{
    u_char  *p, *last;

    p = key->data;
    last = key->data + key->len;

    if (key->len > 3 && p[1] == '{' && last[-1] == '}') {
        p += 2;
        last--;

    } else {
        p++;
    }

    if (key->data[0] != '$' || last - p <= 5
        || ngx_strncasecmp(p, (u_char *) "http_", 5) != 0)
    {
        return;
    }

    p += 5;
    name->data = p;
    name->len = last - p;

    for ( /* void */ ; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9') || *p == '_'))
        {
            /* anything else: not a single header variable */
            name->len = 0;
            return;
        }
    }
}


/*
 * A key that is one variable, $NAME or ${NAME} (a name as
 * ngx_http_script_compile() reads one; $1 is a capture): its index, which
 * the request path reads without the script engine.
 */

static ngx_int_t
ngx_http_meter_key_index(ngx_conf_t *cf, ngx_str_t *key)
{
    u_char     *p, *last;
    ngx_str_t   name;

    if (key->len < 2 || key->data[0] != '$') {
        return NGX_ERROR;
    }

    p = key->data + 1;
    last = key->data + key->len;

    if (*p == '{') {
        if (last[-1] != '}') {
            return NGX_ERROR;
        }

        p++;
        last--;
    }

    if (p == last || (*p >= '0' && *p <= '9')) {
        return NGX_ERROR;
    }

    name.data = p;
    name.len = last - p;

    for ( /* void */ ; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9') || *p == '_'))
        {
            return NGX_ERROR;
        }
    }

    return ngx_http_get_variable_index(cf, &name);
}


char *
ngx_http_meter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                         *value, s, zone;
    ngx_uint_t                         i;
    const char                        *err;
    ngx_http_meter_t                  *m, **mp;
    ngx_http_meter_main_conf_t        *mcf;
    ngx_http_complex_value_t         **cvp;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    if (cf->args->nelts == 2 && ngx_strcmp(value[1].data, "off") == 0) {
        if (mlcf->meters != NGX_CONF_UNSET_PTR) {
            return "is duplicate";
        }

        mlcf->meters = &ngx_http_meter_off;
        return NGX_CONF_OK;
    }

    if (mlcf->meters == &ngx_http_meter_off) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter off\" cannot be mixed with meters at "
                           "the same level");
        return NGX_CONF_ERROR;
    }

    if (mlcf->meters == NGX_CONF_UNSET_PTR) {
        mlcf->meters = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_meter_t));
        if (mlcf->meters == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    m = ngx_array_push(mlcf->meters);
    if (m == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(m, sizeof(ngx_http_meter_t));

    m->file = cf->conf_file->file.name;
    m->line = cf->conf_file->line;

    ngx_str_null(&zone);

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            zone.data = value[i].data + 5;
            zone.len = value[i].len - 5;

            if (zone.len == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "status=", 7) == 0) {
            if (meter_parse_status((const char *) value[i].data + 7,
                                   value[i].len - 7, &m->status, &err)
                != 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: %s",
                                   &value[i], &cmd->name, err);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "subrequests=on") == 0) {
            m->subrequests = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "subrequests=off") == 0) {
            m->subrequests = 0;
            continue;
        }

        if (ngx_strncmp(value[i].data, "method=", 7) == 0) {
            if (meter_parse_methods((const char *) value[i].data + 7,
                                    value[i].len - 7, &m->methods, &err)
                != 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: %s",
                                   &value[i], &cmd->name, err);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "period=", 7) == 0) {
            if (ngx_http_meter_unique_period(cf, m, &value[i]) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        cvp = NULL;

        if (ngx_strncmp(value[i].data, "value=", 6) == 0
            || ngx_strncmp(value[i].data, "max=", 4) == 0
            || ngx_strncmp(value[i].data, "last=", 5) == 0
            || ngx_strncmp(value[i].data, "unique=", 7) == 0)
        {
            if (m->value != NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\" in \"%V\" directive: only one "
                                   "of \"value=\", \"max=\", \"last=\" "
                                   "and \"unique=\" is allowed",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            m->gauge = (value[i].data[0] == 'm') ? NGX_HTTP_METER_GAUGE_MAX
                       : (value[i].data[0] == 'l') ? NGX_HTTP_METER_GAUGE_LAST
                       : 0;
            m->unique = (value[i].data[0] == 'u');
            cvp = &m->value;
            s.data = (u_char *) ngx_strchr(value[i].data, '=') + 1;
            s.len = value[i].data + value[i].len - s.data;

            if (m->unique && ngx_http_meter_unique_var(cf, &value[i], &s)
                             != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            /* read without the script engine, as a zone's key */
            m->vindex = m->unique ? ngx_http_meter_key_index(cf, &s)
                                  : NGX_ERROR;

        } else if (ngx_strncmp(value[i].data, "if=", 3) == 0) {
            cvp = &m->filter;
            s.data = value[i].data + 3;
            s.len = value[i].len - 3;
        }

        if (cvp != NULL) {
            if (s.len == 0 || ngx_http_script_variables_count(&s) == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a variable is expected, such as "
                                   "$bytes_sent", &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            *cvp = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
            if (*cvp == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

            ccv.cf = cf;
            ccv.value = &s;
            ccv.complex_value = *cvp;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            if (ngx_http_meter_add_vars(cf, m, &s) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (m->name.len == 0 && ngx_strchr(value[i].data, '=') == NULL) {
            if (!meter_valid_name((const char *) value[i].data,
                                  value[i].len))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid meter name \"%V\" in \"%V\" "
                                   "directive: use 1 to %d of "
                                   "A-Z a-z 0-9 _ . -",
                                   &value[i], &cmd->name, METER_NAME_MAX);
                return NGX_CONF_ERROR;
            }

            m->name = value[i];
            continue;
        }

        goto invalid;
    }

    if (zone.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter\" must have \"zone\" parameter");
        return NGX_CONF_ERROR;
    }

    if (m->name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter\" must have a meter name");
        return NGX_CONF_ERROR;
    }

    if (m->gauge && ngx_http_meter_gauge_name(cf, m) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (m->uperiod && !m->unique) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"period=\" in \"%V\" directive is only for "
                           "a \"unique=\" meter", &cmd->name);
        return NGX_CONF_ERROR;
    }

    m->shm_zone = ngx_shared_memory_add(cf, &zone, 0,
                                        &ngx_http_meter_module);
    if (m->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_meter_module);

    mp = ngx_array_push(&mcf->meters);
    if (mp == NULL) {
        return NGX_CONF_ERROR;
    }

    *mp = m;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" in \"%V\" directive",
                       &value[i], &cmd->name);
    return NGX_CONF_ERROR;
}


/* the variables of a value= or if=, to read afresh at the log phase */

static ngx_int_t
ngx_http_meter_add_vars(ngx_conf_t *cf, ngx_http_meter_t *m, ngx_str_t *s)
{
    u_char      *p, *last, *start;
    ngx_int_t    index;
    ngx_str_t    name;
    ngx_uint_t  *ip, brace;

    p = s->data;
    last = s->data + s->len;

    while (p < last) {
        if (*p++ != '$' || p == last) {
            continue;
        }

        brace = (*p == '{');
        if (brace) {
            p++;
        }

        start = p;

        while (p < last
               && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                   || (*p >= '0' && *p <= '9') || *p == '_'))
        {
            p++;
        }

        name.data = start;
        name.len = p - start;

        if (brace && p < last && *p == '}') {
            p++;
        }

        /* $1: a capture, not a variable */
        if (name.len == 0 || (*start >= '0' && *start <= '9')) {
            continue;
        }

        index = ngx_http_get_variable_index(cf, &name);
        if (index == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (m->vars == NULL) {
            m->vars = ngx_array_create(cf->pool, 2, sizeof(ngx_uint_t));
            if (m->vars == NULL) {
                return NGX_ERROR;
            }
        }

        ip = ngx_array_push(m->vars);
        if (ip == NULL) {
            return NGX_ERROR;
        }

        *ip = (ngx_uint_t) index;
    }

    return NGX_OK;
}


/* a secret from a file (password_file=): nginx -T shows no password */

static char *
ngx_http_meter_read_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_str_t *file, ngx_str_t *secret)
{
    u_char           buf[1024];
    ssize_t          n;
    ngx_fd_t         fd;
    ngx_str_t        path;
    ngx_file_info_t  fi;

    path = *file;

    if (path.len == 0 || ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK)
    {
        return "has an empty or invalid \"password_file=\"";
    }

    fd = ngx_open_file(path.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "\"%V\" cannot read password_file \"%V\"",
                           &cmd->name, &path);
        return NGX_CONF_ERROR;
    }

    n = NGX_ERROR;

    if (ngx_fd_info(fd, &fi) != NGX_FILE_ERROR
        && ngx_file_size(&fi) < (off_t) sizeof(buf))
    {
        n = ngx_read_fd(fd, buf, sizeof(buf));
    }

    (void) ngx_close_file(fd);

    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
        n--;
    }

    if (n <= 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" password_file \"%V\" is empty, "
                           "unreadable or larger than %uz bytes",
                           &cmd->name, &path, sizeof(buf) - 1);
        return NGX_CONF_ERROR;
    }

    secret->data = ngx_pnalloc(cf->pool, n);
    if (secret->data == NULL) {
        return NGX_CONF_ERROR;
    }

    secret->len = n;
    ngx_memcpy(secret->data, buf, n);
    ngx_explicit_memzero(buf, sizeof(buf));

    return NGX_CONF_OK;
}


char *
ngx_http_meter_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_main_conf_t  *mcf = conf;

    char        *rv;
    u_char      *p;
    ngx_int_t    n;
    ngx_str_t   *value, s;
    ngx_uint_t   i;

    if (mcf->redis_set) {
        return "is duplicate";
    }

    mcf->redis_set = 1;

    value = cf->args->elts;

    if (ngx_strncmp(value[1].data, "sentinel=", 9) == 0) {
        rv = ngx_http_meter_redis_sentinels(cf, cmd, mcf, &value[1]);
        if (rv != NGX_CONF_OK) {
            return rv;
        }

    } else if (ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        if (value[1].len == 5 || value[1].data[5] != '/') {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid address \"%V\" in \"%V\" "
                               "directive: expected unix:/absolute/path",
                               &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }

        mcf->redis_path.data = value[1].data + 5;
        mcf->redis_path.len = value[1].len - 5;

    } else {
        p = (u_char *) ngx_strlchr(value[1].data,
                                   value[1].data + value[1].len, ':');

        n = (p == NULL) ? NGX_ERROR
                        : ngx_atoi(p + 1, value[1].data + value[1].len - p
                                          - 1);

        if (p == NULL || p == value[1].data || n < 1 || n > 65535) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid address \"%V\" in \"%V\" "
                               "directive: expected host:port or "
                               "unix:/path", &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }

        mcf->redis_host.len = p - value[1].data;
        mcf->redis_host.data = ngx_pnalloc(cf->pool,
                                           mcf->redis_host.len + 1);
        if (mcf->redis_host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        (void) ngx_cpystrn(mcf->redis_host.data, value[1].data,
                           mcf->redis_host.len + 1);
        mcf->redis_port = n;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "password=", 9) == 0
            || ngx_strncmp(value[i].data, "password_file=", 14) == 0)
        {
            if (mcf->redis_password.data != NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\" takes one of \"password=\" "
                                   "and \"password_file=\"", &cmd->name);
                return NGX_CONF_ERROR;
            }

            if (value[i].data[8] == '=') {
                mcf->redis_password.data = value[i].data + 9;
                mcf->redis_password.len = value[i].len - 9;
                continue;
            }

            s.data = value[i].data + 14;
            s.len = value[i].len - 14;

            rv = ngx_http_meter_read_secret(cf, cmd, &s,
                                            &mcf->redis_password);
            if (rv != NGX_CONF_OK) {
                return rv;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "master=", 7) == 0
            && mcf->redis_sentinels != NULL && mcf->redis_master.data == NULL
            && value[i].len > 7)
        {
            mcf->redis_master.data = value[i].data + 7;
            mcf->redis_master.len = value[i].len - 7;
            continue;
        }

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            mcf->redis_db = ngx_atoi(value[i].data + 3, value[i].len - 3);

            if (mcf->redis_db == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a database number is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            mcf->redis_timeout = ngx_parse_time(&s, 0);

            if (mcf->redis_timeout == (ngx_msec_t) NGX_ERROR
                || mcf->redis_timeout == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a time such as 500ms or 2s is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\" in \"%V\" directive",
                           &value[i], &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (mcf->redis_sentinels != NULL && mcf->redis_master.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" with \"sentinel=\" needs \"master=\", "
                           "the name the Sentinels monitor", &cmd->name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * sentinel=host:port[,host:port...]: asked in this order for the master
 * (ngx_http_meter_redis.c).  IP addresses are best: hiredis 0.14 resolves
 * a name with a blocking getaddrinfo() on every connect.
 */

static char *
ngx_http_meter_redis_sentinels(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_http_meter_main_conf_t *mcf, ngx_str_t *arg)
{
    u_char                 *p, *last, *comma, *colon;
    ngx_int_t               n;
    ngx_http_meter_addr_t  *sn;

    mcf->redis_sentinels = ngx_array_create(cf->pool, 3,
                                            sizeof(ngx_http_meter_addr_t));
    if (mcf->redis_sentinels == NULL) {
        return NGX_CONF_ERROR;
    }

    p = arg->data + 9;
    last = arg->data + arg->len;

    for ( ;; ) {
        comma = ngx_strlchr(p, last, ',');
        if (comma == NULL) {
            comma = last;
        }

        colon = NULL;

        for (n = 0; p + n < comma; n++) {
            if (p[n] == ':') {
                colon = p + n;
            }
        }

        n = (colon == NULL) ? NGX_ERROR
                            : ngx_atoi(colon + 1, comma - colon - 1);

        if (colon == NULL || colon == p || n < 1 || n > 65535) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid \"%V\" in \"%V\" directive: "
                               "expected sentinel=host:port[,host:port...]",
                               arg, &cmd->name);
            return NGX_CONF_ERROR;
        }

        sn = ngx_array_push(mcf->redis_sentinels);
        if (sn == NULL) {
            return NGX_CONF_ERROR;
        }

        sn->host.len = colon - p;
        sn->host.data = ngx_pnalloc(cf->pool, sn->host.len + 1);
        if (sn->host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        (void) ngx_cpystrn(sn->host.data, p, sn->host.len + 1);
        sn->port = n;

        if (comma == last) {
            break;
        }

        p = comma + 1;
    }

    return NGX_CONF_OK;
}


char *
ngx_http_meter_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                 *value;
    ngx_http_core_loc_conf_t  *clcf;

    if (mlcf->status_on) {
        return "is duplicate";
    }

    mlcf->status_on = 1;
    mlcf->status = NGX_HTTP_METER_STATUS_JSON;

    value = cf->args->elts;

    if (cf->args->nelts == 2) {
        if (ngx_strcmp(value[1].data, "prometheus") == 0) {
            mlcf->status = NGX_HTTP_METER_STATUS_PROM;

        } else if (ngx_strcmp(value[1].data, "json") != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid format \"%V\" in \"%V\" "
                               "directive: use json or prometheus",
                               &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_meter_status_handler;

    return NGX_CONF_OK;
}


/* ngx_conf_set_msec_slot, with a message that shows the bad value */

char *
ngx_http_meter_set_msec(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char       *rv;
    ngx_str_t  *value;

    rv = ngx_conf_set_msec_slot(cf, cmd, conf);

    if (rv == NGX_CONF_OK || rv == NGX_CONF_ERROR) {
        return rv;
    }

    value = cf->args->elts;

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" directive (%s): a "
                       "time such as 500ms or 2s is expected",
                       &value[1], &cmd->name, rv);

    return NGX_CONF_ERROR;
}


char *
ngx_http_meter_governance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                   *value, s;
    ngx_int_t                    t;
    ngx_uint_t                   i;
    ngx_http_meter_gov_conf_t   *gcf, **gcfp;
    ngx_http_meter_main_conf_t  *mcf;

    if (mlcf->gov != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        if (cf->args->nelts != 2) {
            return "takes no parameters after \"off\"";
        }

        mlcf->gov = NULL;
        return NGX_CONF_OK;
    }

    gcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_gov_conf_t));
    if (gcf == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;

            if (s.len == 0) {
                goto invalid;
            }

            gcf->shm_zone = ngx_shared_memory_add(cf, &s, 0,
                                                  &ngx_http_meter_module);
            if (gcf->shm_zone == NULL) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "on_redis_down=open") == 0) {
            gcf->closed = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "on_redis_down=closed") == 0) {
            gcf->closed = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=allow") == 0) {
            gcf->unknown = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=401") == 0) {
            gcf->unknown = NGX_HTTP_UNAUTHORIZED;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=403") == 0) {
            gcf->unknown = NGX_HTTP_FORBIDDEN;
            continue;
        }

        if (ngx_strncmp(value[i].data, "grace=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

            t = ngx_parse_time(&s, 1);

            if (t == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a time such as 3d or 12h is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            gcf->grace = (time_t) t;
            continue;
        }

        goto invalid;
    }

    if (gcf->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    gcf->file = cf->conf_file->file.name;
    gcf->line = cf->conf_file->line;
    gcf->http = (cf->cmd_type == NGX_HTTP_MAIN_CONF);

    mlcf->gov = gcf;

    /* every gate, wherever written: postconfiguration checks them all */
    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_meter_module);

    gcfp = ngx_array_push(&mcf->gov_confs);
    if (gcfp == NULL) {
        return NGX_CONF_ERROR;
    }

    *gcfp = gcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" in \"%V\" directive "
                       "(expected zone=, on_redis_down=open|closed, "
                       "unknown_key=allow|401|403 or grace=)",
                       &value[i], &cmd->name);
    return NGX_CONF_ERROR;
}
