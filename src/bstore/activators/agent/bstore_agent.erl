%% bstore_agent: the control agent bstore runs inside a BEAM node.
%%
%% bstore (Python) talks to a running node through this module only: a Unix domain
%% socket speaking 4-byte length-prefixed External Term Format frames. Requests are
%% `{Id, Op, Args}` (Args a list); replies are `{Id, ok, Result}` or
%% `{Id, error, Reason}`. Every request is decoded with `binary_to_term(B, [safe])`, so
%% a frame cannot create atoms; names that must become atoms (a module or application
%% that is not loaded yet, a new env key) are created explicitly and boundedly by the
%% `intern` operation first. A frame that cannot be decoded is answered with
%% `{undefined, error, {bad_frame, Why}}` and the connection stays open.
%%
%% Socket permissions, race-free: the socket is bound inside a directory that must be
%% private (no group/other permission bits, checked before binding), then chmod'ed to
%% 0600. Nobody else can reach the socket during the window between bind and chmod,
%% because nobody else can traverse its directory.
%%
%% Start: `erl ... -bstore_agent_socket PATH -eval 'bstore_agent:start()'` (the path is
%% an argv item, never Erlang source), or `bstore_agent:start(Path)` from code.
%% OTP only, no dependencies. Never kills a process: a purge that would need to is
%% reported as `{lingering, Pids}`.
-module(bstore_agent).

-export([start/0, start/1, ops/0]).

-include_lib("kernel/include/file.hrl").

%% Frames above this are refused by the socket itself ({packet_size, ...}).
-define(MAX_FRAME, 16 * 1024 * 1024).
%% sys:suspend/resume/change_code of one process; a process that is not sys-compliant
%% would otherwise block a reload forever.
-define(SYS_TIMEOUT, 5000).
%% Upper bound of atoms one `intern` request may create (atoms are never collected).
-define(MAX_INTERN, 4096).

%% ---------------------------------------------------------------- start

%% Start on the socket named by the `-bstore_agent_socket PATH` argument; halt the node
%% with status 2 if that fails, so a node that cannot be controlled does not linger.
start() ->
    case init:get_argument(bstore_agent_socket) of
        {ok, [[Path]]} ->
            case start(Path) of
                {ok, _Pid} ->
                    ok;
                {error, Reason} ->
                    io:format(standard_error, "bstore_agent: cannot listen on ~ts: ~p~n",
                              [Path, Reason]),
                    erlang:halt(2)
            end;
        _ ->
            io:format(standard_error,
                      "bstore_agent: expected exactly one -bstore_agent_socket PATH~n", []),
            erlang:halt(2)
    end.

%% Start the listener on Path; returns {ok, ListenerPid} once the socket is 0600.
start(Path0) ->
    Path = unicode:characters_to_list(Path0),
    Parent = self(),
    {Pid, Ref} = spawn_monitor(fun() -> listener_init(Parent, Path) end),
    receive
        {Pid, Result} ->
            erlang:demonitor(Ref, [flush]),
            Result;
        {'DOWN', Ref, process, Pid, Reason} ->
            {error, {listener_crashed, Reason}}
    end.

listener_init(Parent, Path) ->
    case prepare_socket_path(Path) of
        ok ->
            Opts = [{ifaddr, {local, Path}}, binary, {packet, 4},
                    {packet_size, ?MAX_FRAME}, {active, false}, {backlog, 64}],
            case gen_tcp:listen(0, Opts) of
                {ok, Listen} ->
                    case file:change_mode(Path, 8#600) of
                        ok ->
                            try register(bstore_agent, self()) of
                                true ->
                                    Parent ! {self(), {ok, self()}},
                                    accept_loop(Listen)
                            catch error:badarg ->
                                gen_tcp:close(Listen),
                                Parent ! {self(), {error, agent_already_registered}}
                            end;
                        {error, Reason} ->
                            gen_tcp:close(Listen),
                            Parent ! {self(), {error, {chmod, Reason}}}
                    end;
                {error, Reason} ->
                    Parent ! {self(), {error, {listen, Reason}}}
            end;
        {error, Reason} ->
            Parent ! {self(), {error, Reason}}
    end.

%% The directory must be private; a leftover socket is removed only when nothing
%% answers on it (a live agent keeps its socket).
prepare_socket_path(Path) ->
    Dir = filename:dirname(Path),
    case file:read_file_info(Dir) of
        {ok, #file_info{type = directory, mode = Mode}} when Mode band 8#077 =:= 0 ->
            remove_stale_socket(Path);
        {ok, #file_info{type = directory, mode = Mode}} ->
            {error, {directory_not_private, unicode:characters_to_binary(Dir),
                     Mode band 8#777}};
        {ok, _} ->
            {error, {not_a_directory, unicode:characters_to_binary(Dir)}};
        {error, Reason} ->
            {error, {directory, unicode:characters_to_binary(Dir), Reason}}
    end.

remove_stale_socket(Path) ->
    case file:read_link_info(Path) of
        {error, enoent} ->
            ok;
        {ok, #file_info{type = other}} ->
            case gen_tcp:connect({local, Path}, 0, [binary, {active, false}], 1000) of
                {ok, Sock} ->
                    gen_tcp:close(Sock),
                    {error, {agent_already_running, unicode:characters_to_binary(Path)}};
                {error, _} ->
                    file:delete(Path)
            end;
        {ok, #file_info{type = Type}} ->
            {error, {not_a_socket, unicode:characters_to_binary(Path), Type}};
        {error, Reason} ->
            {error, {socket_path, unicode:characters_to_binary(Path), Reason}}
    end.

accept_loop(Listen) ->
    case gen_tcp:accept(Listen) of
        {ok, Sock} ->
            Pid = spawn(fun() -> receive go -> connection_loop(Sock) end end),
            case gen_tcp:controlling_process(Sock, Pid) of
                ok -> Pid ! go;
                {error, _} -> exit(Pid, kill), gen_tcp:close(Sock)
            end,
            accept_loop(Listen);
        {error, closed} ->
            exit(normal);
        {error, _} ->
            %% e.g. emfile: back off instead of spinning.
            timer:sleep(100),
            accept_loop(Listen)
    end.

%% One process per connection: a crash here never reaches the listener.
connection_loop(Sock) ->
    case gen_tcp:recv(Sock, 0) of
        {ok, Frame} ->
            case gen_tcp:send(Sock, term_to_binary(handle_frame(Frame))) of
                ok -> connection_loop(Sock);
                {error, _} -> gen_tcp:close(Sock)
            end;
        {error, _} ->
            gen_tcp:close(Sock)
    end.

handle_frame(Frame) ->
    try binary_to_term(Frame, [safe]) of
        {Id, Op, Args} when is_atom(Op), is_list(Args) ->
            dispatch(Id, Op, Args);
        {Id, _, _} ->
            {Id, error, {bad_request, <<"expected {Id, Op :: atom(), Args :: list()}">>}};
        _ ->
            {undefined, error, {bad_request, <<"expected {Id, Op, Args}">>}}
    catch
        error:badarg ->
            {undefined, error,
             {bad_frame, <<"not a valid external term, or it names atoms, funs or "
                           "references unknown to this node (decoded with [safe])">>}}
    end.

dispatch(Id, Op, Args) ->
    try op(Op, Args) of
        {ok, Result} -> {Id, ok, Result};
        {error, Reason} -> {Id, error, Reason}
    catch
        Class:Reason:Stack ->
            {Id, error, {exception, Op, Class, Reason, lists:sublist(Stack, 5)}}
    end.

%% ---------------------------------------------------------------- operations

%% Every operation with its arities (for `unknown_op` vs `bad_args`).
ops() ->
    [{ping, [0]}, {node_info, [0]}, {intern, [1]},
     {add_patha, [1]}, {del_path, [1]}, {get_path, [0]}, {set_path, [1]},
     {load_module, [2]}, {purge, [1]}, {module_md5s, [1]},
     {app_load, [1]}, {app_start, [1, 2]}, {app_ensure_all_started, [1]}, {app_stop, [1]},
     {app_unload, [1]}, {which_applications, [0]}, {loaded_applications, [0]},
     {get_env, [1, 2]}, {set_env, [3]}, {unset_env, [2]}, {config_change, [2]},
     {reconfigure, [3]}, {suspend, [1, 2]}, {resume, [1]}, {change_code, [4]},
     {reload, [3]}, {process_info, [1]}, {stop_node, [0]}, {health_check, [3]},
     {nodes, [0]}, {connect_node, [1]}, {restart_app, [5]},
     {app_running, [1]}, {old_code, [1]}, {app_versions, [0]}].

op(ping, []) ->
    {ok, pong};
op(node_info, []) ->
    {UptimeMs, _} = erlang:statistics(wall_clock),
    {ok, #{node => node(),
           otp_release => list_to_binary(erlang:system_info(otp_release)),
           erts_version => list_to_binary(erlang:system_info(version)),
           os_pid => list_to_integer(os:getpid()),
           uptime_ms => UptimeMs,
           memory_total => erlang:memory(total)}};
op(intern, [Names]) when is_list(Names), length(Names) =< ?MAX_INTERN ->
    case lists:all(fun is_binary/1, Names) of
        true ->
            lists:foreach(fun(N) -> binary_to_atom(N, utf8) end, Names),
            {ok, ok};
        false ->
            {error, {bad_args, intern, [Names]}}
    end;
op(add_patha, [Dir]) ->
    case code:add_patha(path(Dir)) of
        true -> {ok, ok};
        {error, Reason} -> {error, {Reason, Dir}}
    end;
op(del_path, [Dir]) ->
    case code:del_path(path(Dir)) of
        Bool when is_boolean(Bool) -> {ok, Bool};
        {error, Reason} -> {error, {Reason, Dir}}
    end;
op(get_path, []) ->
    {ok, [unicode:characters_to_binary(P) || P <- code:get_path()]};
op(set_path, [Dirs]) when is_list(Dirs) ->
    case code:set_path([path(D) || D <- Dirs]) of
        true -> {ok, ok};
        {error, Reason} -> {error, Reason}
    end;
op(load_module, [Mod, Path]) when is_atom(Mod) ->
    load_abs(Mod, path(Path));
op(purge, [Mod]) when is_atom(Mod) ->
    case soft_purge(Mod) of
        ok -> {ok, ok};
        {lingering, Pids} -> {error, {lingering, Pids}}
    end;
op(module_md5s, [App]) when is_atom(App) ->
    case application:get_key(App, modules) of
        {ok, Mods} -> {ok, maps:from_list([{M, md5(M)} || M <- Mods])};
        undefined -> {error, {not_loaded, App}}
    end;
op(app_load, [App]) when is_atom(App) ->
    ok_or_error(application:load(App));
op(app_start, [App]) when is_atom(App) ->
    ok_or_error(application:start(App));
op(app_start, [App, Type]) when is_atom(App), is_atom(Type) ->
    ok_or_error(application:start(App, Type));
op(app_ensure_all_started, [App]) when is_atom(App) ->
    application:ensure_all_started(App);
op(app_stop, [App]) when is_atom(App) ->
    ok_or_error(application:stop(App));
op(app_unload, [App]) when is_atom(App) ->
    ok_or_error(application:unload(App));
%% One app's restart in one request: stop + unload (each tolerating an app already
%% stopped/unloaded), drop its old ebin, prepend the new ones, soft purge + load the
%% given modules, load the app, set its env, ensure_all_started. The first failing step
%% answers {error, {step, Op, Reason}} with Op the single operation of that step, so the
%% caller reports exactly what the separate operations would have.
op(restart_app, [App, OldEbin, Ebins, ModPaths, Env])
  when is_atom(App), is_list(Ebins), is_list(ModPaths), is_list(Env) ->
    Steps = [fun() -> tolerate(app_stop, application:stop(App), not_started) end,
             fun() -> tolerate(app_unload, application:unload(App), not_loaded) end,
             fun() -> restart_del_path(OldEbin) end,
             fun() -> restart_add_paths(lists:reverse(Ebins)) end,
             fun() -> restart_load(ModPaths) end,
             fun() -> tolerate(app_load, application:load(App), already_loaded) end,
             fun() -> restart_set_env(App, Env) end],
    case run_steps(Steps) of
        ok ->
            case application:ensure_all_started(App) of
                {ok, Started} ->
                    purge_replaced([M || {M, _} <- ModPaths]),
                    {ok, Started};
                {error, Reason} ->
                    {error, {step, app_ensure_all_started, Reason}}
            end;
        Error ->
            Error
    end;
%% The modules (of the given ones) that still have old code loaded.
op(old_code, [Mods]) when is_list(Mods) ->
    {ok, [M || M <- Mods, is_atom(M), erlang:check_old_code(M)]};
%% The version of App when it runs, false when it does not (which_applications for one).
op(app_running, [App]) when is_atom(App) ->
    case lists:keyfind(App, 1, application:which_applications()) of
        {App, _, Vsn} -> {ok, bin(Vsn)};
        false -> {ok, false}
    end;
op(app_versions, []) ->
    {ok, [{A, bin(V)} || {A, _, V} <- application:which_applications()]};
op(which_applications, []) ->
    {ok, [{A, bin(D), bin(V)} || {A, D, V} <- application:which_applications()]};
op(loaded_applications, []) ->
    {ok, [{A, bin(D), bin(V)} || {A, D, V} <- application:loaded_applications()]};
op(get_env, [App]) when is_atom(App) ->
    {ok, application:get_all_env(App)};
op(get_env, [App, Key]) when is_atom(App), is_atom(Key) ->
    case application:get_env(App, Key) of
        {ok, Value} -> {ok, {ok, Value}};
        undefined -> {ok, undefined}
    end;
op(set_env, [App, Key, Value]) when is_atom(App), is_atom(Key) ->
    ok_or_error(application:set_env(App, Key, Value));
op(unset_env, [App, Key]) when is_atom(App), is_atom(Key) ->
    ok_or_error(application:unset_env(App, Key));
op(config_change, [App, OldEnv]) when is_atom(App), is_list(OldEnv) ->
    %% config_change/1 compares every running app against EnvBefore, and an app
    %% missing from it counts as changed: start from the full current picture.
    EnvBefore = lists:keystore(App, 1, application_controller:prep_config_change(),
                               {App, OldEnv}),
    config_changed(application_controller:config_change(EnvBefore));
op(reconfigure, [App, Set, Unset]) when is_atom(App), is_list(Set), is_list(Unset) ->
    EnvBefore = application_controller:prep_config_change(),
    lists:foreach(fun({K, V}) when is_atom(K) -> ok = application:set_env(App, K, V) end, Set),
    lists:foreach(fun(K) when is_atom(K) -> ok = application:unset_env(App, K) end, Unset),
    config_changed(application_controller:config_change(EnvBefore));
op(suspend, [App]) when is_atom(App) ->
    suspend_app(App, all);
op(suspend, [App, Mods]) when is_atom(App), is_list(Mods) ->
    suspend_app(App, Mods);
op(resume, [App]) when is_atom(App) ->
    %% Not by walking the tree: which_children on a suspended supervisor never returns.
    resume_all([P || P <- erlang:processes(), is_suspended(P),
                     application:get_application(P) =:= {ok, App}]);
op(resume, [Pids]) when is_list(Pids) ->
    resume_all([P || P <- Pids, is_pid(P)]);
op(change_code, [Pid, Mod, OldVsn, Extra]) when is_pid(Pid), is_atom(Mod) ->
    case catch sys:change_code(Pid, Mod, OldVsn, Extra, ?SYS_TIMEOUT) of
        ok -> {ok, ok};
        {error, Reason} -> {error, {change_code_failed, Pid, Mod, Reason}};
        {'EXIT', Reason} -> {error, {change_code_failed, Pid, Mod, Reason}}
    end;
op(reload, [App, ModPaths, Extra]) when is_atom(App), is_list(ModPaths) ->
    reload(App, [{M, path(P)} || {M, P} <- ModPaths, is_atom(M)], Extra);
op(process_info, [Pid]) when is_pid(Pid) ->
    case erlang:process_info(Pid, [current_function, registered_name, status]) of
        undefined ->
            {ok, undefined};
        Info ->
            {ok, maps:from_list([{K, V} || {K, V} <- Info, V =/= []])}
    end;
op(health_check, [App, Mod, TimeoutMs])
  when is_atom(App), is_atom(Mod), is_integer(TimeoutMs), TimeoutMs > 0 ->
    health_check(App, Mod, TimeoutMs);
op(nodes, []) ->
    %% Read-only: the distribution peers this node is connected to (cluster tracking).
    {ok, nodes()};
op(connect_node, [Node]) when is_atom(Node) ->
    %% Only `name@host` atoms, only when distributed: a guest rejoins the cluster of a
    %% host node that restarted (the kernel connects at boot only). Returns the boolean.
    case is_alive() andalso lists:member($@, atom_to_list(Node)) of
        true -> {ok, net_kernel:connect_node(Node)};
        false -> {ok, false}
    end;
op(stop_node, []) ->
    %% init:stop/0 only signals init; the reply goes out before the shutdown starts.
    ok = init:stop(),
    {ok, ok};
op(Op, Args) ->
    case lists:keyfind(Op, 1, ops()) of
        false -> {error, {unknown_op, Op}};
        {Op, _} -> {error, {bad_args, Op, Args}}
    end.

%% ---------------------------------------------------------------- helpers

%% A library application (no `mod`) has no config_change/3 to call: its new env is
%% simply in place, which is all a reconfigure promises.
config_changed({error, Errors}) when is_list(Errors) ->
    case [E || E <- Errors, not is_module_not_defined(E)] of
        [] -> {ok, ok};
        Left -> {error, Left}
    end;
config_changed({error, Error}) ->
    case is_module_not_defined(Error) of
        true -> {ok, ok};
        false -> {error, Error}
    end;
config_changed(ok) -> {ok, ok}.

is_module_not_defined({module_not_defined, _App}) -> true;
is_module_not_defined(_) -> false.

%% After a restart the replaced code is old, and nothing runs it: the app was stopped
%% before the load. Purging it now (soft: a process of another app still inside it keeps
%% it, and the next switch reports that process) frees it, and takes the purge out of the
%% next restart of these modules, where it would lengthen the app's downtime. A process
%% of its own: the reply does not wait for it.
purge_replaced([]) -> ok;
purge_replaced(Mods) ->
    spawn(fun() -> lists:foreach(fun code:soft_purge/1, Mods) end),
    ok.

run_steps([]) -> ok;
run_steps([Step | Rest]) ->
    case Step() of
        ok -> run_steps(Rest);
        {error, _} = Error -> Error
    end.

tolerate(_, ok, _) -> ok;
tolerate(_, {error, {Harmless, _}}, Harmless) -> ok;
tolerate(Op, {error, Reason}, _) -> {error, {step, Op, Reason}}.

restart_del_path(undefined) -> ok;
restart_del_path(Dir) ->
    case code:del_path(path(Dir)) of
        Bool when is_boolean(Bool) -> ok;
        {error, Reason} -> {error, {step, del_path, {Reason, Dir}}}
    end.

restart_add_paths([]) -> ok;
restart_add_paths([Dir | Rest]) ->
    case code:add_patha(path(Dir)) of
        true -> restart_add_paths(Rest);
        {error, Reason} -> {error, {step, add_patha, {Reason, Dir}}}
    end.

restart_load([]) -> ok;
restart_load([{Mod, Path} | Rest]) when is_atom(Mod) ->
    case load_abs(Mod, path(Path)) of
        {ok, _} -> restart_load(Rest);
        {error, Reason} -> {error, {step, load_module, Reason}}
    end.

restart_set_env(_, []) -> ok;
restart_set_env(App, [{Key, Value} | Rest]) when is_atom(Key) ->
    ok = application:set_env(App, Key, Value),
    restart_set_env(App, Rest).

ok_or_error(ok) -> {ok, ok};
ok_or_error({error, Reason}) -> {error, Reason}.

bin(Chars) when is_list(Chars) -> unicode:characters_to_binary(Chars);
bin(Other) -> Other.

path(P) when is_binary(P); is_list(P) ->
    case unicode:characters_to_list(P) of
        L when is_list(L) -> L;
        _ -> erlang:error({bad_path, P})
    end.

md5(Mod) ->
    case code:is_loaded(Mod) of
        false -> not_loaded;
        _ -> Mod:module_info(md5)
    end.

%% The processes still executing Mod's old code: the reason a soft purge fails.
lingering(Mod) ->
    [P || P <- erlang:processes(), P =/= self(),
          (catch erlang:check_process_code(P, Mod)) =:= true].

soft_purge(Mod) ->
    case code:soft_purge(Mod) of
        true -> ok;
        false -> {lingering, lingering(Mod)}
    end.

load_abs(Mod, Path) ->
    Root = filename:rootname(Path, ".beam"),
    case filename:basename(Root) =:= atom_to_list(Mod) of
        false ->
            {error, {module_name_mismatch, Mod, unicode:characters_to_binary(Path)}};
        true ->
            case soft_purge(Mod) of
                {lingering, Pids} ->
                    {error, {lingering, Pids}};
                ok ->
                    case code:load_abs(Root) of
                        {module, Mod} -> {ok, {module, Mod}};
                        {error, Reason} -> {error, {load_failed, Mod, Reason}}
                    end
            end
    end.

%% The vsn release_handler would pass to code_change: the -vsn value, unwrapped.
module_vsn(Mod) ->
    case code:is_loaded(Mod) of
        false ->
            undefined;
        _ ->
            case lists:keyfind(vsn, 1, Mod:module_info(attributes)) of
                false -> undefined;
                {vsn, Vsn} -> unwrap_vsn(Vsn)
            end
    end.

%% As release_handler_1:get_vsn/1: a string stays, a one-element list is unwrapped.
unwrap_vsn(Vsn) ->
    case io_lib:printable_unicode_list(Vsn) of
        true -> Vsn;
        false when is_list(Vsn), length(Vsn) =:= 1 -> hd(Vsn);
        false -> Vsn
    end.

%% ---------------------------------------------------------------- process tree

%% [{Pid, Modules | dynamic}] of App's supervision tree (supervisors included), keeping
%% those that run one of Mods (all: every one).
app_processes(App, Mods) ->
    case application_controller:get_master(App) of
        undefined ->
            {error, {not_running, App}};
        Master ->
            case catch application_master:get_child(Master) of
                {Top, _AppMod} when is_pid(Top) ->
                    Tree = [{Top, [callback_module(Top)]} | children(Top)],
                    {ok, [{P, M} || {P, M} <- Tree, runs_any(M, Mods)]};
                _ ->
                    {ok, []}
            end
    end.

callback_module(Sup) ->
    case catch supervisor:get_callback_module(Sup) of
        Mod when is_atom(Mod) -> Mod;
        _ -> undefined
    end.

children(Sup) ->
    Children = case catch supervisor:which_children(Sup) of
                   L when is_list(L) -> L;
                   _ -> []
               end,
    lists:flatmap(
      fun({_Id, Pid, supervisor, Mods}) when is_pid(Pid) -> [{Pid, Mods} | children(Pid)];
         ({_Id, Pid, worker, Mods}) when is_pid(Pid) -> [{Pid, Mods}];
         (_) -> []
      end, Children).

runs_any(_, all) -> true;
runs_any(dynamic, _) -> true;
runs_any(Mods, Wanted) -> lists:any(fun(M) -> lists:member(M, Wanted) end, Mods).

suspend_app(App, Mods) ->
    case app_processes(App, Mods) of
        {ok, Procs} ->
            case suspend_all([P || {P, _} <- Procs], []) of
                {ok, Pids} -> {ok, Pids};
                {error, Pid, Reason} -> {error, {suspend_failed, Pid, Reason}}
            end;
        Error ->
            Error
    end.

%% Suspend every pid or none: on a failure the ones already suspended are resumed.
suspend_all([], Done) ->
    {ok, lists:reverse(Done)};
suspend_all([Pid | Rest], Done) ->
    case catch sys:suspend(Pid, ?SYS_TIMEOUT) of
        ok ->
            suspend_all(Rest, [Pid | Done]);
        {'EXIT', {noproc, _}} ->
            %% Exited since the tree was read: nothing to suspend.
            suspend_all(Rest, Done);
        Other ->
            _ = resume_all(Done),
            {error, Pid, Other}
    end.

%% A process suspended by sys waits in sys:suspend_loop.
is_suspended(Pid) ->
    case erlang:process_info(Pid, current_function) of
        {current_function, {sys, suspend_loop, _}} -> true;
        _ -> false
    end.

resume_all(Pids) ->
    Failed = [{P, R} || P <- Pids,
                        R <- [catch sys:resume(P, ?SYS_TIMEOUT)],
                        R =/= ok, not is_noproc(R)],
    case Failed of
        [] -> {ok, ok};
        _ -> {error, {resume_failed, Failed}}
    end.

is_noproc({'EXIT', {noproc, _}}) -> true;
is_noproc(_) -> false.

%% ---------------------------------------------------------------- reload

%% suspend -> soft purge -> load -> change_code -> resume. All modules are prepared
%% (read and validated) before anything is suspended and then loaded atomically, so a
%% failure at any step leaves the old code current and every process resumed.
reload(App, ModPaths, Extra) ->
    Mods = [M || {M, _} <- ModPaths],
    case read_beams(ModPaths, []) of
        {error, _} = Error ->
            Error;
        {ok, Beams} ->
            OldVsns = [{M, module_vsn(M)} || M <- Mods],
            OldBins = [Obj || Obj = {_, _, _} <- [old_object(M) || M <- Mods]],
            case code:prepare_loading(Beams) of
                {error, Errors} ->
                    {error, {reload, prepare, Errors}};
                {ok, Prepared} ->
                    case app_processes(App, Mods) of
                        {error, Reason} ->
                            {error, {reload, suspend, Reason}};
                        {ok, Procs} ->
                            reload_suspended(Procs, Mods, Prepared, OldVsns, OldBins, Extra)
                    end
            end
    end.

read_beams([], Acc) ->
    {ok, lists:reverse(Acc)};
read_beams([{Mod, Path} | Rest], Acc) ->
    File = filename:rootname(Path, ".beam") ++ ".beam",
    case file:read_file(File) of
        {ok, Bin} -> read_beams(Rest, [{Mod, File, Bin} | Acc]);
        {error, Reason} ->
            {error, {reload, read, Mod, unicode:characters_to_binary(File), Reason}}
    end.

%% The current object code of Mod (to restore it if a later step fails).
old_object(Mod) ->
    case code:is_loaded(Mod) of
        {file, File} when is_list(File) ->
            case file:read_file(File) of
                {ok, Bin} -> {Mod, File, Bin};
                _ -> none
            end;
        _ ->
            none
    end.

reload_suspended(Procs, Mods, Prepared, OldVsns, OldBins, Extra) ->
    case suspend_all([P || {P, _} <- Procs], []) of
        {error, Pid, Reason} ->
            {error, {reload, suspend, Pid, Reason}};
        {ok, Suspended} ->
            Result = reload_steps(Procs, Mods, Prepared, OldVsns, OldBins, Extra),
            Resumed = resume_all(Suspended),
            case {Result, Resumed} of
                {ok, {ok, ok}} ->
                    {ok, #{modules => Mods, processes => Suspended}};
                {ok, {error, Why}} ->
                    {error, {reload, resume, Why}};
                {{error, _} = Error, _} ->
                    Error
            end
    end.

reload_steps(Procs, Mods, Prepared, OldVsns, OldBins, Extra) ->
    case purge_all(Mods) of
        {error, _} = Error ->
            Error;
        ok ->
            case code:finish_loading(Prepared) of
                {error, Errors} ->
                    {error, {reload, load, Errors}};
                ok ->
                    Pairs = [{P, M} || {P, PMods} <- Procs, M <- Mods,
                                       runs_any(PMods, [M])],
                    change_all(Pairs, [], Mods, OldVsns, OldBins, Extra)
            end
    end.

purge_all([]) ->
    ok;
purge_all([Mod | Rest]) ->
    case soft_purge(Mod) of
        ok -> purge_all(Rest);
        {lingering, Pids} -> {error, {reload, purge, Mod, {lingering, Pids}}}
    end.

change_all([], _Done, _Mods, _OldVsns, _OldBins, _Extra) ->
    ok;
change_all([{Pid, Mod} | Rest], Done, Mods, OldVsns, OldBins, Extra) ->
    {Mod, OldVsn} = lists:keyfind(Mod, 1, OldVsns),
    case catch sys:change_code(Pid, Mod, OldVsn, Extra, ?SYS_TIMEOUT) of
        ok ->
            change_all(Rest, [{Pid, Mod} | Done], Mods, OldVsns, OldBins, Extra);
        {'EXIT', {noproc, _}} ->
            change_all(Rest, Done, Mods, OldVsns, OldBins, Extra);
        Failure ->
            Reason = case Failure of
                         {error, R} -> R;
                         {'EXIT', R} -> R;
                         R -> R
                     end,
            Rollback = rollback(Done, Mods, OldBins, Extra),
            {error, {reload, change_code, Pid, Mod, Reason, Rollback}}
    end.

%% Downgrade the processes already converted, then make the old code current again.
rollback(Done, Mods, OldBins, Extra) ->
    NewVsns = [{M, module_vsn(M)} || M <- Mods],
    Down = [{P, M, R} || {P, M} <- Done,
                         {_, NewVsn} <- [lists:keyfind(M, 1, NewVsns)],
                         R <- [catch sys:change_code(P, M, {down, NewVsn}, Extra,
                                                    ?SYS_TIMEOUT)],
                         R =/= ok],
    Restore = [{M, R} || M <- Mods, R <- [restore(M, OldBins)], R =/= ok],
    case {Down, Restore} of
        {[], []} -> rolled_back;
        _ -> {rollback_incomplete, #{downgrade => Down, restore => Restore}}
    end.

restore(Mod, OldBins) ->
    case lists:keyfind(Mod, 1, OldBins) of
        false ->
            no_old_code;
        {Mod, File, Bin} ->
            %% The old code is "old" now; suspended processes do not run it, so the
            %% soft purge succeeds unless an unsuspended process does.
            case soft_purge(Mod) of
                {lingering, Pids} ->
                    {lingering, Pids};
                ok ->
                    case code:load_binary(Mod, File, Bin) of
                        {module, Mod} -> ok;
                        {error, Reason} -> {load_failed, Reason}
                    end
            end
    end.

%% ---------------------------------------------------------------- health

%% Run Mod:check() for a custom health check. Deliberately narrow: Mod must be one of
%% the modules of App, and App must be running, so this op cannot call arbitrary code.
%% The check runs in its own (unlinked) process; one that does not answer within
%% TimeoutMs is ended, since it is our own helper and not an application process.
health_check(App, Mod, TimeoutMs) ->
    Running = lists:keymember(App, 1, application:which_applications()),
    Owns = case application:get_key(App, modules) of
               {ok, Mods} -> lists:member(Mod, Mods);
               undefined -> false
           end,
    if
        not Running -> {error, {not_running, App}};
        not Owns -> {error, {not_a_module_of, App, Mod}};
        true ->
            {Pid, Ref} = spawn_monitor(fun() -> exit({check_result, Mod:check()}) end),
            receive
                {'DOWN', Ref, process, Pid, {check_result, Result}} -> {ok, Result};
                {'DOWN', Ref, process, Pid, Reason} -> {ok, {crashed, Reason}}
            after TimeoutMs ->
                exit(Pid, kill),
                receive {'DOWN', Ref, process, Pid, _} -> ok end,
                {ok, timeout}
            end
    end.
